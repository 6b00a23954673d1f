"""Tests for fused_kernels/attention.py: the Triton attention kernel against its torch twin, forward and backward.

On a CPU the kernel runs in Triton's interpreter (tests/conftest.py); run with TRITON_INTERPRET=0 on a GPU to test
the compiled one. The kernel's tiles are the A100's there too (fused_kernels/triton_attention.py, TILES).
The interpreter is slow, so the cases below cover every value of each axis (T, E, H/K, soft-cap, window,
padding, dtype) and the combinations that interact (window with padding gives rows with no visible key),
rather than the full product.
"""
import pytest
import torch

from fused_kernels import backend

pytest.importorskip("triton", reason="Triton is not installed (no wheels for this platform): the kernel is not "
                    "tested; the model runs the torch twin")
import fused_kernels.attention as A  # noqa: E402

# tests/conftest.py sets TRITON_INTERPRET=1 unless it is set: a CPU runs the kernel in Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not backend.INTERPRET else "cpu"

# Tolerances, |triton - reference| <= atol + rtol * |reference|, elementwise.
# fp32: the kernel and the twin compute the same sums in another order (key tiles, online rescaling of the
#   softmax); we see errors of ~3e-6 on values of size ~1-10 (interpreted). Compiled, the dots are three TF32
#   products (tf32x3), off by ~2^-21 relative each. A 1% error in the scale gives ~1e-2.
# bf16: the reference is the twin in fp32 on the same bf16 inputs. bf16 keeps 8 significant bits: rounding
#   the output alone costs up to 2^-9 relative (8e-3 at 4), and p and dS are rounded to bf16 before their
#   products, as in the twin and FlashAttention-2. The twin run in bf16 is itself off by up to ~1.5e-2, and
#   the kernel (which rounds to nearest also when interpreted, see _cast) uses at most ~55% of this tolerance.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

f32, bf16 = torch.float32, torch.bfloat16
CASES = [  # T, E, H, K, softcap, window, padded, dtype
    (1, 64, 2, 2, None, None, False, f32),       # a single position
    (7, 64, 3, 1, None, None, False, f32),       # less than one tile; 3 query heads share one kv head
    (64, 128, 6, 2, None, None, False, f32),     # exactly one tile
    (130, 64, 6, 2, None, None, False, f32),     # three query tiles, the last ragged
    (130, 64, 3, 1, 2.0, None, False, f32),      # soft-cap small enough to bend the scores
    (130, 128, 2, 2, None, 20, False, f32),      # window: whole key tiles skipped
    (130, 64, 6, 2, 2.0, 5, True, f32),          # everything, and padded rows that see no key
    (7, 128, 3, 1, 2.0, 3, True, f32),
    (64, 256, 2, 1, 50.0, None, True, f32),      # Gemma 2 head dim and cap; 32 x 32 tiles
    (33, 40, 2, 1, None, None, False, f32),      # head dim not a power of two: padded to 64
    (7, 64, 6, 2, 2.0, None, False, bf16),
    (64, 64, 6, 2, None, None, True, bf16),
    (130, 128, 3, 1, 2.0, 20, True, bf16),
    (130, 64, 2, 2, None, None, False, bf16),
]


def make(T, E, H, K, padded, dtype, B=2, seed=0):
    """q, k, v as the model passes them: transposed views of (B, T, heads, E), not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, n, E, generator=gen).to(DEVICE, dtype).transpose(1, 2) for n in (H, K, K))
    mask = None
    if padded:                                   # right padding: row 0 is half as long, row 1 full
        mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
        mask[0, (T + 1) // 2:] = 0
    do = torch.randn(B, T, H, E, generator=gen).to(DEVICE, dtype).transpose(1, 2)   # (B, H, T, E), a view
    return q, k, v, mask, do


def visible_rows(T, window, mask, B=2):
    """(B, 1, T, 1): query rows that see at least one key; the twin averages uniformly over the others."""
    t = torch.arange(T, device=DEVICE)
    sees = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < (window or T))   # (T, T)
    real = torch.ones(B, T, dtype=torch.bool, device=DEVICE) if mask is None else mask.bool()
    return (sees[None] & real[:, None, :]).any(-1)[:, None, :, None]


def run(impl, q, k, v, do, dtype, **kw):
    """Output and (dq, dk, dv) of `impl` ("triton" or "torch") on q, k, v cast to dtype, for the upstream
    gradient do."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o = {"triton": A.attention_triton, "torch": A.attention_torch}[impl](q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(dtype)))


@pytest.mark.parametrize("T,E,H,K,softcap,window,padded,dtype", CASES)
def test_matches_twin(T, E, H, K, softcap, window, padded, dtype):
    q, k, v, mask, do = make(T, E, H, K, padded, dtype)
    kw = dict(scale=E ** -0.5, softcap=softcap, window=window, attention_mask=mask)
    rows = visible_rows(T, window, mask)
    do = do * rows                               # a loss ignores rows that see nothing (see the kernel's docstring)
    got = run("triton", q, k, v, do, dtype, **kw)
    want = run("torch", q, k, v, do, torch.float32, **kw)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        if name == "o":                          # compare the rows the twin defines; the others are 0
            assert (g * ~rows == 0).all()
            g, w = g * rows, w * rows
        torch.testing.assert_close(g.float(), w, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_rows_with_no_visible_key_are_zero_not_nan():
    T, window = 40, 4                            # row 0 is real up to 20; its queries from 23 on see nothing
    q, k, v, mask, do = make(T, 64, 2, 1, True, torch.float32)
    o, dq, dk, dv = run("triton", q, k, v, do, torch.float32, scale=0.125, window=window, attention_mask=mask)
    assert all(x.isfinite().all() for x in (o, dq, dk, dv))
    assert (o[0, :, 23:] == 0).all() and (dq[0, :, 23:] == 0).all()
    assert (o[0, :, :23].abs().sum(-1) > 0).all()


def test_a_wrong_scale_is_caught():
    """The comparison can fail: 1% off in the scale is far outside the fp32 tolerance."""
    q, k, v, mask, do = make(64, 64, 3, 1, False, torch.float32)
    got = run("triton", q, k, v, do, torch.float32, scale=0.125 * 1.01)
    want = run("torch", q, k, v, do, torch.float32, scale=0.125)
    for g, w in zip(got, want):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_default_model_kernel_matches_twin():
    """The default model (SmolLM2-135M: 9 heads on 3 kv heads, E = 64): logits and weight gradients.

    Interpreted, each layer costs ~1 s forward and backward and every layer runs the same kernel on the same
    shapes, so on a CPU only the first 8 of the 30 layers run (the final norm and head then read the residual
    stream after layer 8; all 30 pass too, in ~30 s); on a GPU all 30.
    """
    C = pytest.importorskip("checkpoint")
    try:
        model = C.from_pretrained(C.DEFAULT_NAME, device=DEVICE)
    except FileNotFoundError as e:               # the default model's package is not installed
        pytest.skip(str(e))
    if DEVICE == "cpu":
        model.model.layers = model.model.layers[:8]
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ids = ids.to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0                              # right padding
    real = mask.bool()
    weights = [model.layers[0].self_attn.q_proj.weight, model.layers[1].self_attn.k_proj.weight,
               model.layers[-1].self_attn.v_proj.weight, model.layers[-1].mlp.down_proj.weight]
    results = {}
    for impl in ("torch", "triton"):
        with backend.forced(impl):               # every layer's attention through `impl`, on any device
            logits = model(ids, mask)            # (B, T, V) fp32
        target = logits[real].log_softmax(-1)[:, 0].sum()    # a scalar of the real positions only
        results[impl] = (logits[real].detach(), torch.autograd.grad(target, weights))
    (l_twin, g_twin), (l_kern, g_kern) = results["torch"], results["triton"]
    # fp32 throughout. With all 30 layers we saw logit errors of 6e-5 (logits up to 34) and gradient errors
    # of 4e-5 of the largest gradient.
    torch.testing.assert_close(l_kern, l_twin, **TOL[torch.float32])
    for g, w in zip(g_kern, g_twin):
        assert (g - w).abs().max() <= 5e-4 * w.abs().max()


def test_twin_scores_stay_fp32_under_autocast():
    """bf16 training runs the forward pass under autocast (and backward() after it); the twin's scores, softmax
    and products must stay in fp32 all the same."""
    q, k, v, mask, do = make(9, 64, 6, 2, True, torch.float32)
    kw = dict(scale=0.125, attention_mask=mask)
    plain = run("torch", q, k, v, do, torch.float32, **kw)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    with torch.autocast(q.device.type, dtype=torch.bfloat16):
        o = A.attention_torch(q, k, v, **kw)
    auto = (o, *torch.autograd.grad(o, (q, k, v), do))
    for a, b in zip(auto, plain):
        assert a.dtype == torch.float32 and torch.equal(a, b)


# --- the kernel at Gemma 3's attention shapes -------------------------------------------------------

def test_kernel_head_dim_256_one_kv_head():
    """E = 256 with one key/value head for four query heads (Gemma 3 270M), a window, padding; fp32 (in Triton's
    interpreter on a CPU). Forward and backward against the torch twin."""
    B, H, K, T, E, window = 2, 4, 1, 40, 256, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, n, E, generator=gen).to(DEVICE).transpose(1, 2).requires_grad_()
               for n in (H, K, K))                                # (B, H, T, E), (B, K, T, E) x 2
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[0, 29:] = 0                                              # right padding
    kw = dict(scale=256 ** -0.5, window=window, attention_mask=mask)
    do = torch.randn(B, H, T, E, generator=gen).to(DEVICE)
    real = mask.bool()[:, None, :, None]                          # padded query rows are never used
    outs = []
    for f in (A.attention_triton, A.attention_torch):
        o = f(q, k, v, **kw)
        grads = torch.autograd.grad((o * do * real).sum(), (q, k, v))
        outs.append((o * real, *grads))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
