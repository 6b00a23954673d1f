"""train.py on a tiny random model: the loss, the schedule, freezing, reproducibility, checkpoints, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
from checkpoint_io import checkpoint as C
import train

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_tiny):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def run_main(tiny_dir, small_json, out, *extra):
    metrics = train.main(["--model", str(tiny_dir), "--dataset", small_json, "--out", str(out), "--epochs", "1",
                          "--lr", "1e-2", "--device", "cpu", *extra])
    return metrics


def test_loss_covers_only_answer_tokens(tiny_dir):
    m, tok = C.from_pretrained(tiny_dir), C.load_tokenizer(tiny_dir)
    ex = data.load_dataset("second_hop")["facts"][:6]
    ids, mask, labels = data.encode_examples(tok, ex)
    loss = train.answer_loss(m, ids, mask, labels)
    # reference: the full logits at every position, cross-entropy where the next token is an answer token
    logits = m(ids, mask)[:, :-1]                                   # (B, T-1, V)
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # changing a prompt token's label would change a loss that (wrongly) included it; ours ignores prompts
    n_answer = sum(len(tok.encode(f"{e.prompt} {e.answer}").ids) - len(tok.encode(e.prompt).ids) for e in ex)
    assert (labels != -100).sum() == n_answer
    on_all = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
                             .reshape(-1), ignore_index=-100)
    assert not torch.isclose(loss, on_all)


def test_schedule_warmup_then_linear_decay():
    f = [train.lr_factor(s, 20) for s in range(20)]
    assert f[0] == 0.5 and f[1] == 1.0                              # 10% of 20 steps: 2 warmup steps
    assert all(a > b for a, b in zip(f[1:], f[2:])) and f[-1] == pytest.approx(1 / 19)
    assert {train.lr_factor(s, 20, schedule="constant") for s in range(20)} == {1.0}


def test_adam_in_backward_equals_one_adam_over_all_parameters(tiny_dir):
    """AdamInBackward steps each parameter inside backward(); the result must be one Adam's, bit for bit."""
    tok = C.load_tokenizer(tiny_dir)
    ids, mask, labels = data.encode_examples(tok, data.load_dataset("first_hop")["facts"][:6])
    ours, ref, base = (C.from_pretrained(tiny_dir) for _ in range(3))
    names = set(train.trainable_names(base))                      # the blocks
    params = {}
    for m in (ours, ref):
        for n, p in m.named_parameters():
            p.requires_grad_(n in names)
        params[m] = [p for n, p in m.named_parameters() if n in names]
    opt = train.AdamInBackward(params[ours], lr=1e-3)
    adam = torch.optim.Adam(params[ref], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=True)
    for step, lr in enumerate([1e-3, 3e-3, 2e-3]):
        rows = torch.tensor([step, step + 3])
        opt.start_step(lr)
        train.answer_loss(ours, ids[rows], mask[rows], labels[rows]).backward()
        assert all(p.grad is None for p in params[ours])        # each gradient freed once used
        adam.param_groups[0]["lr"] = lr
        adam.zero_grad(set_to_none=True)
        train.answer_loss(ref, ids[rows], mask[rows], labels[rows]).backward()
        adam.step()
    changed = 0
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n
        changed += not torch.equal(a, base.state_dict()[n])
    assert changed == len(params[ours])                           # every trainable parameter moved
    opt.remove()                                                  # unhooked: backward no longer steps
    before = [p.detach().clone() for p in params[ours]]
    train.answer_loss(ours, ids, mask, labels).backward()
    assert all(p.grad is not None and torch.equal(p, b) for p, b in zip(params[ours], before))


def test_adam_by_hand_is_the_fused_kernel():
    """Devices without PyTorch's fused Adam run AdamInBackward's update as written (Kingma & Ba, Algorithm 1):
    three steps of it must match the fused kernel that runs on CPU."""
    torch.manual_seed(0)
    start = torch.randn(300)
    p_fused, p_hand = (start.clone().requires_grad_(True) for _ in range(2))
    fused, hand = train.AdamInBackward([p_fused], lr=0.0), train.AdamInBackward([p_hand], lr=0.0)
    assert fused.fused
    hand.fused = False                                            # p_hand: the by-hand update, as on such devices
    for lr in (1e-2, 3e-2, 2e-2):
        g = torch.randn(300)
        for opt, p in ((fused, p_fused), (hand, p_hand)):
            opt.start_step(lr)
            (p * g).sum().backward()
    assert (p_fused != start).all()                               # every entry moved
    torch.testing.assert_close(p_hand, p_fused, rtol=1e-6, atol=1e-7)
    for a, b in zip(hand.state[p_hand], fused.state[p_fused]):    # m and v
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_split_layers():
    assert train.split_layers(30, "early") == list(range(23)) and train.split_layers(30, "late") == list(range(23, 30))
    assert train.split_layers(32, "early") == list(range(24)) and train.split_layers(4, "late") == [3]


@pytest.mark.parametrize("when", ["post", "pre"])
def test_freeze_keeps_frozen_weights_bit_identical(tiny_dir, small_json, tmp_path, when):
    base = load_file(str(tiny_dir / "model.safetensors"))
    run_main(tiny_dir, small_json, tmp_path / "out", "--freeze", "early", "--freeze-when", when)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    frozen = tuple(f"model.layers.{i}." for i in range(3))         # 4 layers: early = 0, 1, 2
    assert any(k.startswith(frozen) for k in base)
    for k in base:
        if k.startswith(frozen) or not k.startswith("model.layers."):   # frozen layers; embeddings, head, norm
            assert torch.equal(after[k], base[k]), k
        else:
            assert not torch.equal(after[k], base[k]), k           # the late layer did train
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["frozen_layers"] == [0, 1, 2]
    assert (metrics["records"][-1]["phase"] == "post_freeze") == (when == "post")


def test_same_seed_same_metrics(tiny_dir, small_json, tmp_path):
    a = run_main(tiny_dir, small_json, tmp_path / "a", "--seed", "3")["records"]
    b = run_main(tiny_dir, small_json, tmp_path / "b", "--seed", "3")["records"]
    c = run_main(tiny_dir, small_json, tmp_path / "c", "--seed", "4")["records"]
    assert a == b
    assert [r["loss"] for r in a] != [r["loss"] for r in c]         # the seed does reach the shuffling
    assert torch.equal(load_file(str(tmp_path / "a" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"],
                       load_file(str(tmp_path / "b" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"])


def test_checkpoint_reloads_to_identical_logits(tiny_dir, tmp_path):
    m = C.from_pretrained(tiny_dir)
    out = tmp_path / "run"
    # train a little through main(), then compare the saved checkpoint with the model main() trained
    ds = data.load_dataset("daxwug")
    metrics = train.main(["--model", str(tiny_dir), "--dataset", "daxwug", "--order", "facts_first", "--epochs", "1",
                          "--lr", "1e-3", "--out", str(out), "--device", "cpu", "--batch-size", "40"])
    assert [r["phase"] for r in metrics["records"]] == ["pretrain_facts"] * 2 + ["pretrain_impls"] * 2 + ["finetune"] * 2
    assert {"epoch", "loss", "fact_mean_rank", "impl_mean_rank"} <= set(metrics["records"][0])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["records"] == metrics["records"] and saved["args"]["dataset"] == "daxwug"
    assert saved["wall_time_s"] > 0 and saved["base_model"] == str(tiny_dir)
    assert (out / "ranks.png").stat().st_size > 0 and (out / "tokenizer.json").exists()
    ours = C.from_pretrained(out)
    ids, mask = data.encode_prompts(C.load_tokenizer(out), [e.prompt for e in ds["test_impls"]])
    with torch.no_grad():
        got = ours(ids, mask)
        ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(got, m(ids, mask))               # it did train
    # the last record's ranks are those of the saved weights, evaluated in fp32 whatever the run's precision
    rank = data.mean_rank(ours, C.load_tokenizer(out), ds["test_impls"])
    assert rank == metrics["records"][-1]["impl_mean_rank"]
    real = mask.bool()
    torch.testing.assert_close(ref[real], got[real], rtol=1e-4, atol=1e-4)


def test_bad_input_gets_one_line_error(tiny_dir, small_json, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"facts": [{"prompt": "x"}], "implications": []}')
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(["--dataset", "nope"], "error: unknown dataset 'nope'"),
             (["--dataset", str(bad)], "error: " + str(bad) + ": facts[0]: 'answer' is missing"),
             (["--dataset", small_json, "--out", str(blocker / "out")], "error: cannot write the output")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            train.main(["--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "o"), *argv])
        assert isinstance(e.value.code, str) and e.value.code.startswith(msg) and "\n" not in e.value.code
    # and from the command line: one line on stderr, no traceback
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dataset", "nope", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("error: unknown dataset 'nope'")


FAULTS_SCRIPT = """
import ctypes, resource, sys, torch
sys.path.insert(0, {root!r})
from run_setup import speedups
mallopt = ctypes.CDLL("libc.so.6").mallopt   # start from glibc's documented defaults, not what imports made of them
assert mallopt(speedups.M_TRIM_THRESHOLD, 128 * 1024) and mallopt(speedups.M_MMAP_THRESHOLD, 128 * 1024)
if sys.argv[1] == "keep":
    assert speedups.keep_freed_memory()
faults = []
for _ in range(4):                  # a training step's pattern: allocate, touch, free the same 256 MB again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(1 << 20) for _ in range(64)]       # 4 MB each
    del xs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_freed_memory tunes glibc's malloc (Linux)")
def test_keep_freed_memory_stops_page_faults_on_reuse():
    """With glibc's default thresholds, memory freed at the end of one step goes back to the OS and the next step
    faults it in again (64k page faults for 256 MB here); after keep_freed_memory it is reused."""
    script = FAULTS_SCRIPT.format(root=str(ROOT))
    run = lambda mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                          check=True).stdout)
    default, keep = run("default"), run("keep")
    assert default > 50000, default
    assert keep < 100, keep


def test_unknown_device_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--device", "foo"])
    assert e.value.code == 2                                       # argparse's usage error, no traceback
    assert "argument --device: unknown device 'foo'" in capsys.readouterr().err


def adam_runs(tiny_dir, steps=(1e-3, 3e-3, 2e-3), **options):
    """Three steps of AdamInBackward(options) and of torch.optim.Adam (fp32) from the same weights: the two
    models' (update, reference update) per trained parameter."""
    tok = C.load_tokenizer(tiny_dir)
    ids, mask, labels = data.encode_examples(tok, data.load_dataset("first_hop")["facts"][:6])
    ours, ref, base = (C.from_pretrained(tiny_dir) for _ in range(3))
    names = set(train.trainable_names(base))
    params = {}
    for m in (ours, ref):
        for n, p in m.named_parameters():
            p.requires_grad_(n in names)
        params[m] = [p for n, p in m.named_parameters() if n in names]
    opt = train.AdamInBackward(params[ours], lr=1e-3, **options)
    adam = torch.optim.Adam(params[ref], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=True)
    for step, lr in enumerate(steps):
        rows = torch.tensor([step % 3, step % 3 + 3])
        opt.start_step(lr)
        train.answer_loss(ours, ids[rows], mask[rows], labels[rows]).backward()
        adam.param_groups[0]["lr"] = lr
        adam.zero_grad(set_to_none=True)
        train.answer_loss(ref, ids[rows], mask[rows], labels[rows]).backward()
        adam.step()
    opt.remove()
    start = base.state_dict()
    return opt, {n: (a.detach() - start[n], b.detach() - start[n])
                 for (n, a), b in zip(ours.named_parameters(), ref.parameters()) if n in names}


def test_offloaded_moments_give_the_fp32_update_bit_for_bit(tiny_dir):
    """--offload-optimizer: the moments live on the host and visit the device for each step (here the device is
    the host, so this checks the bookkeeping; on CUDA the same code copies them): the same update, bit for bit."""
    opt, upd = adam_runs(tiny_dir, offload=True)
    assert all(m.device.type == "cpu" for m, _ in opt.state.values())
    for n, (a, b) in upd.items():
        assert torch.equal(a, b), n


def test_bf16_moments_update_within_two_percent(tiny_dir):
    """--moments bf16: m and v are stored rounded to bf16 (8 significant bits: up to 2^-9 = 0.2% off each), the
    update computed in fp32 from them, on fp32 weights. Over 5 steps each parameter's total update stays within 2%
    of plain fp32 Adam's in norm (measured: 0.10-0.15%), and every update is the fp32 master weight's: none lost."""
    opt, upd = adam_runs(tiny_dir, steps=(1e-3, 3e-3, 2e-3, 2e-3, 1e-3), moments="bf16")
    assert all(m.dtype == v.dtype == torch.bfloat16 for m, v in opt.state.values())
    worst = max(float((a - b).norm() / b.norm()) for a, b in upd.values())
    assert 0 < worst < 0.02, worst                                # not the fp32 update, but within 2%
    for n, (a, b) in upd.items():
        assert (a != 0).float().mean() > 0.99, n                  # the update reached (nearly) every weight
