"""The dtype policy (run_setup/precision.py): the CPU's bf16 matrix instructions and the default they choose; the bf16
weight copies against autocast (the same matmuls, without a cast per matmul) and fp32; the copies refreshed by each
optimizer step; the cheap divergence check."""
import pytest
import torch

import data
import model as M
import train
from checkpoint_io import checkpoint as C
from run_setup import precision
from run_setup.optim import AdamInBackward, all_finite


def test_isa_and_default_dtype():
    assert precision.cpu_isa({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "AMX"
    assert precision.cpu_isa({"avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert precision.cpu_isa({"avx2", "avx512f"}) == "neither" and precision.cpu_isa(set()) == "neither"
    assert precision.default_dtype("cpu", "Linux", "AMX", True) == "bfloat16"
    assert precision.default_dtype("cpu", "Linux", "AVX512-BF16", True) == "bfloat16"
    assert precision.default_dtype("cpu", "Linux", "AMX", False) == "float32"     # the bf16 checks failed
    assert precision.default_dtype("cpu", "Linux", "neither", True) == "float32"
    assert precision.default_dtype("cpu", "Darwin", "AMX", True) == "float32"      # macOS: fp32
    assert precision.default_dtype("cuda", "Linux", "AMX", True) == "float32"      # not measured on a GPU yet
    d = precision.describe("cpu", "bfloat16")
    assert d["dtype"] == "bfloat16" and d["cpu_isa"] in ("AMX", "AVX512-BF16", "neither") and d["cpu"]
    with pytest.raises(ValueError, match="dtype must be one of"):
        with precision.matmuls(None, "float16"):
            pass


def test_bf16_without_matrix_instructions_warns():
    """bf16 on a CPU without bf16 matrix instructions runs as fp32 kernels on bf16 values (no faster than fp32): the
    finetune says so in one line; nowhere else."""
    assert "no bf16 matrix instructions" in precision.slow_bf16("cpu", "bfloat16", "neither")
    assert precision.slow_bf16("cpu", "bfloat16", "AMX") is None
    assert precision.slow_bf16("cpu", "bfloat16", "AVX512-BF16") is None
    assert precision.slow_bf16("cpu", "float32", "neither") is None
    assert precision.slow_bf16("meta", "bfloat16", "neither") is None              # not a CPU: not this warning


def loss_and_grads(m, ids, mask, mode):
    """logits and every weight's gradient of a logsumexp loss, in fp32, under autocast, or from bf16 copies."""
    m.zero_grad(set_to_none=True)
    with precision.matmuls(m, "bfloat16" if mode == "copies" else "float32"), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        h = m.hidden(ids, mask)                                               # (B, T, D)
        with torch.autocast("cpu", enabled=False):                           # the head in fp32, as in training
            logits = m.logits(h.float())                                      # (B, T, V)
        logits[mask.bool()].logsumexp(-1).sum().backward()
    return logits.float(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])                      # qwen2: q/k/v biases
def test_bf16_copies_are_autocasts_matmuls_without_the_casts(tmp_path, family, padded_batch):
    """The copies run the matmuls autocast runs, on the same bf16 operands: the same logits (bit for bit; the head
    in fp32 in both), weight gradients within 3% of the largest entry of autocast's (the backward's bf16 sums run
    in another order), and as close to fp32's as autocast's are (2-10% of the largest entry, both).
    The gradients reach the fp32 masters in fp32."""
    from test_model import save_tiny
    save_tiny(family, tmp_path)
    m = C.from_pretrained(tmp_path)
    ids, mask = padded_batch
    ref, g32 = loss_and_grads(m, ids, mask, "fp32")
    amp, gamp = loss_and_grads(m, ids, mask, "autocast")
    got, gcp = loss_and_grads(m, ids, mask, "copies")
    assert all(getattr(mod, "lowp", None) is None for mod in m.modules())     # removed after the block
    real = mask.bool()
    torch.testing.assert_close(got[real], amp[real], rtol=0, atol=0)
    torch.testing.assert_close(got[real], ref[real], rtol=5e-2, atol=5e-2 * ref[real].abs().max().item())
    assert set(gcp) == set(gamp) == set(g32)
    for n in g32:
        assert gcp[n].dtype == torch.float32, n
        scale = g32[n].abs().max().item()
        err = lambda g: (g - g32[n]).abs().max().item() / scale         # off fp32, relative to the largest entry
        assert (gcp[n] - gamp[n]).abs().max().item() < 3e-2 * scale, n   # measured: up to 0.027
        assert err(gcp[n]) < 1.25 * err(gamp[n]) + 1e-3, (n, err(gcp[n]), err(gamp[n]))   # 0.02-0.10, both


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_tiny):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("isa", ["AMX", "neither"])                        # torch's bf16 kernels, or fp32 ones
def test_weight_gradient_is_the_fp32_product_of_the_bf16_values(monkeypatch, isa):
    """model.LowpMatmul's weight gradient: the bf16 inputs and output gradient multiplied and summed in fp32 and
    handed to the fp32 master as they are, not rounded to bf16 (autocast's is: off by up to 2^-9 of an entry)."""
    from fused_kernels import backend
    monkeypatch.setattr(backend, "cpu_isa", lambda flags=None: isa)
    g = torch.Generator().manual_seed(0)
    lin = M.Linear(96, 40, bias=True)
    lin.lowp, lin.lowp_bias = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    x = torch.randn(3, 7, 96, generator=g).bfloat16()                         # bf16 numbers: cast exactly
    c = torch.randn(3, 7, 40, generator=g).bfloat16()                         # the output's gradient, bf16 numbers
    (lin(x).float() * c.float()).sum().backward()
    exact = c.double().reshape(-1, 40).T @ x.double().reshape(-1, 96)          # (40, 96), no rounding at all
    assert lin.weight.grad.dtype == torch.float32
    torch.testing.assert_close(lin.weight.grad.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    assert not torch.equal(lin.weight.grad, exact.bfloat16().float())         # not the bf16-rounded product
    torch.testing.assert_close(lin.bias.grad.double(), c.double().sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_copies_are_refreshed_by_each_step(tiny_dir):
    """After every optimizer step each trained weight's copy is that weight rounded to bf16; frozen ones unchanged."""
    m = C.from_pretrained(tiny_dir)
    params = [p for n, p in m.named_parameters() if n.startswith("model.layers.")]
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("model.layers."))
    tok = C.load_tokenizer(tiny_dir)
    ids, mask, labels = data.encode_examples(tok, data.load_dataset("first_hop")["facts"][:4])
    with precision.matmuls(m, "bfloat16") as copies:
        assert copies.head is not None and copies.head.dtype == torch.bfloat16      # the frozen head
        opt = AdamInBackward(params, 1e-2, after_step=copies.refresh)
        for _ in range(2):
            opt.start_step(1e-2)
            train.answer_loss(m, ids, mask, labels, head=copies.head).backward()
        opt.remove()
        for mod in m.modules():
            if isinstance(mod, M.Linear):
                assert torch.equal(mod.lowp, mod.weight.detach().to(torch.bfloat16))
        moved = [p for p in params if p.dim() == 2]
        assert moved and all(copies.of[p].dtype == torch.bfloat16 for p in moved)


def test_all_finite_sees_nan_and_inf():
    ps = [torch.randn(50, 7), torch.randn(13)]
    assert all_finite(ps)
    for bad in (float("nan"), float("inf"), float("-inf")):
        qs = [p.clone() for p in ps]
        qs[0][3, 4] = bad
        assert not all_finite(qs)


@pytest.mark.parametrize("isa, warned", [("neither", True), ("AMX", False)])
def test_finetune_warns_of_slow_bf16(tiny_dir, monkeypatch, isa, warned):
    """train.finetune logs precision.slow_bf16's line when bf16 is asked for on a CPU without bf16 matrix
    instructions, and not on one with them."""
    monkeypatch.setattr(precision, "cpu_isa", lambda flags=None: isa)
    m = C.from_pretrained(tiny_dir)
    tok = C.load_tokenizer(tiny_dir)
    ex = data.load_dataset("first_hop")["facts"][:4]
    lines = []
    train.finetune(m, tok, [("facts", ex, {"facts": ex, "implications": ex})],
                   train.Settings(epochs=1, dtype="bfloat16", lr=1e-3, eval="final"), lines.append)
    assert any("no bf16 matrix instructions" in x for x in lines) == warned


def test_evaluation_is_fp32_under_bf16_copies(tiny_dir, monkeypatch):
    """precision.fp32 sets the bf16 copies aside (the fp32 model's logits to the bit) and puts them back; train's
    evaluation runs inside it, so a bf16 run's ranks are fp32 ranks of its weights."""
    m = C.from_pretrained(tiny_dir)
    tok = C.load_tokenizer(tiny_dir)
    ex = data.load_dataset("first_hop")["facts"][:4]
    ids, mask = data.encode_prompts(tok, [e.prompt for e in ex])
    with torch.no_grad():
        ref = m(ids, mask)
        with precision.matmuls(m, "bfloat16"):
            bf = m(ids, mask)
            assert not torch.equal(bf, ref)
            with precision.fp32(m):
                assert torch.equal(m(ids, mask), ref)
            assert torch.equal(m(ids, mask), bf)                  # the copies are back
    seen = []
    monkeypatch.setattr(data, "mean_rank", lambda model, *a, **k: seen.append(
        any(getattr(x, "lowp", None) is not None for x in model.modules())) or 0.0)
    with precision.matmuls(m, "bfloat16"):
        train.evaluate(m, tok, {"facts": ex}, train.Settings(dtype="bfloat16"))
    assert seen == [False]


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtype of every matrix product torch runs inside the `with` block (aten mm, addmm, bmm)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.add(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_matmul_on_fp32_kernels_is_a_bf16_matmul(monkeypatch):
    """backend.linear / matmul on a CPU without bf16 matrix instructions: fp32 kernels on the bf16 values, the product
    rounded to bf16. Like torch's bf16 kernel (the dispatch forced to it by naming the CPU "AMX"), every entry is the
    exact product rounded to bf16, give or take one bf16 step (fp32 sums in another order); neither is the fp32
    product, which is no bf16 number. Only bf16 CPU tensors on such a CPU take this path."""
    from fused_kernels import backend
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((37, 300), (150, 300), (150,)))
    xw = x.double() @ w.double().T                                            # (37, 150): no rounding at all
    refs = (xw + b.double(), xw)                                              # linear with bias, matmul
    # one bf16 step (2^-8 of the value: the rounding), and what 300 fp32 additions can lose (near-cancelling sums)
    bound = x.double().abs() @ w.double().abs().T
    steps = [r.abs() * 2 ** -8 + 300 * 2 ** -24 * bd for r, bd in ((refs[0], bound + b.double().abs()), (xw, bound))]
    for isa in ("neither", "AMX"):
        monkeypatch.setattr(backend, "cpu_isa", lambda flags=None: isa)
        assert backend.bf16_on_fp32_kernels(x) == (isa == "neither")
        with MatmulDtypes() as seen:
            out = (backend.linear(x, w, b), backend.matmul(x, w.T))
        assert seen.seen == ({torch.float32} if isa == "neither" else {torch.bfloat16}), isa
        for y, ref, step in zip(out, refs, steps):
            assert y.dtype == torch.bfloat16
            assert ((y.double() - ref).abs() <= step).all(), isa                # within one bf16 step
            assert (y == ref.to(torch.bfloat16)).float().mean() > 0.9, isa     # mostly the rounded exact product
    assert not backend.bf16_on_fp32_kernels(x.float())                       # fp32 stays fp32's kernel
    assert not backend.bf16_on_fp32_kernels(x.to("meta"))                   # not a CPU tensor


def test_bf16_training_on_fp32_kernels(tiny_dir, monkeypatch):
    """A bf16 training step on a CPU without bf16 matrix instructions runs no bf16 matmul (so none of torch's slow
    fallbacks), and its loss and gradients are the bf16 kernels' within what bf16's order of sums moves them
    (the same 3% of the largest entry as autocast against the copies above), further from fp32 than from them."""
    from fused_kernels import backend
    m = C.from_pretrained(tiny_dir)
    tok = C.load_tokenizer(tiny_dir)
    ids, mask, labels = data.encode_examples(tok, data.load_dataset("first_hop")["facts"][:8])
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("model.layers."))

    def step(isa, dtype="bfloat16"):
        monkeypatch.setattr(backend, "cpu_isa", lambda flags=None: isa)
        m.zero_grad(set_to_none=True)
        with precision.matmuls(m, dtype) as copies, MatmulDtypes() as seen:
            loss = train.answer_loss(m, ids, mask, labels, head=copies and copies.head)
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, seen.seen

    l_emu, g_emu, seen_emu = step("neither")
    l_bf, g_bf, seen_bf = step("AMX")
    l32, g32, _ = step("neither", "float32")
    assert seen_emu == {torch.float32} and torch.bfloat16 in seen_bf
    assert abs(l_emu - l_bf) < 1e-2 * abs(l_bf)
    for n in g32:
        scale = g_bf[n].abs().max().item()
        assert (g_emu[n] - g_bf[n]).abs().max().item() < 3e-2 * scale, n
    off = lambda g: sum((g[n] - g32[n]).norm().item() for n in g32)
    assert off(g_emu) > 0 and off(g_bf) > 0                                  # both bf16: neither is fp32
