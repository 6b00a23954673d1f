"""Tests for fused_kernels/grad_delta.py: the informative score of one linear map per position and group (eq. 4/7).

The Triton kernel is checked against the torch twin, and the twin against a float64 brute force.
On a CPU the kernel runs in Triton's interpreter (tests/conftest.py); run with TRITON_INTERPRET=0 on a GPU to test
the compiled one.
"""
import pytest
import torch

from fused_kernels import backend

pytest.importorskip("triton", reason="Triton is not installed (no wheels for this platform): the kernel is not "
                    "tested; scores.py runs the torch twin")
from fused_kernels.grad_delta import grad_delta, grad_delta_torch, grad_delta_triton  # noqa: E402

IMPL = {"triton": grad_delta_triton, "torch": grad_delta_torch}
# tests/conftest.py sets TRITON_INTERPRET=1 unless it is set: a CPU runs the kernel in Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not backend.INTERPRET else "cpu"
# Max |triton - twin| as a fraction of max |twin|. bf16 inputs are upcast exactly and both sides accumulate
# in fp32, so only the summation order differs, for either input dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}


def make(N, O, I, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, O, generator=gen)                          # (N, O) gradient at the output
    x = torch.randn(N, I, generator=gen)                          # (N, I) input
    dW = 0.01 * torch.randn(O, I, generator=gen)                  # (O, I) a small weight change
    return [t.to(DEVICE, dtype) for t in (g, x, dW)]


def assert_scaled_close(got, want, tol):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * max |want| {scale:.3g}"


# (N, O, I, n_groups, split): N = 1 and N past one 64-position block; widths that are not powers of two;
# groups of 16, 24, 48 and 100 columns (narrower than, or spilling past, the 64-wide block); GQA k/v.
SHAPES = [
    (1, 144, 100, 3, "out"),      # q_proj of 3 heads x 48
    (37, 144, 100, 9, "out"),     # 9 heads x 16
    (37, 144, 100, 1, "out"),     # whole map (an MLP's gate/up)
    (130, 200, 72, 2, "out"),     # groups of 100 rows: two blocks each, the second one masked
    (37, 48, 144, 2, "out"),      # GQA k_proj: K = 2 kv heads x E = 24 from D = 144
    (1, 100, 144, 3, "in"),       # o_proj of 3 heads x 48
    (37, 100, 144, 9, "in"),
    (37, 72, 200, 1, "in"),       # whole map (down_proj)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,O,I,n_groups,split", SHAPES)
def test_triton_matches_twin(N, O, I, n_groups, split, dtype):
    g, x, dW = make(N, O, I, dtype)
    got = grad_delta_triton(g, x, dW, n_groups, split)
    want = grad_delta_torch(g, x, dW, n_groups, split)
    assert got.shape == (N, n_groups) and got.dtype == torch.float32
    assert_scaled_close(got, want, TOL[dtype])


def test_triton_strided_and_mixed_dtype():
    # Non-contiguous g and x (transposed views) and fp32 dW with bf16 activations.
    g, x, dW = make(37, 144, 100)
    g_t, x_t = g.t().contiguous().t(), x.t().contiguous().t()    # same values, column-major strides
    for split, n_groups in [("out", 3), ("in", 4)]:
        want = grad_delta_torch(g, x.bfloat16(), dW, n_groups, split)
        got = grad_delta_triton(g_t, x_t.bfloat16(), dW, n_groups, split)
        assert_scaled_close(got, want, 1e-5)


@pytest.mark.parametrize("split", ["out", "in"])
def test_twin_matches_float64_loops(split):
    N, O, I, n_groups = 3, 6, 4, 2
    g, x, dW = make(N, O, I)
    gd, xd, Wd = g.double(), x.double(), dW.double()
    want = torch.zeros(N, n_groups, dtype=torch.float64)
    for n in range(N):                                            # eq. 4: sum_{o,i} g[n,o] dW[o,i] x[n,i]
        for o in range(O):
            for i in range(I):
                j = o // (O // n_groups) if split == "out" else i // (I // n_groups)
                want[n, j] += gd[n, o] * Wd[o, i] * xd[n, i]
    got = grad_delta_torch(g, x, dW, n_groups, split)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("split,n_groups", [("out", 3), ("in", 4)])
def test_groups_sum_to_whole_map(impl, split, n_groups):
    g, x, dW = make(37, 144, 100)
    got = IMPL[impl](g, x, dW, n_groups, split)       # (N, n_groups)
    whole = (g * (x @ dW.T)).sum(-1)                              # (N,) g_n . dW x_n
    assert_scaled_close(got.sum(-1), whole, 1e-5)
    # Summed over positions too: <dW, sum_n g_n x_n^T>, the first-order change of R (REFERENCE, Scores).
    inner = (dW * (g.T @ x)).sum()
    assert abs(got.sum().item() - inner.item()) <= 1e-4 * whole.abs().sum().item()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("split", ["out", "in"])
def test_wrong_group_split_is_detected(impl, split):
    # Change only group 1's weights (rows for "out", columns for "in"): every other group must score
    # exactly zero. Interleaved groups, or groups along the wrong dimension, would leak into them.
    N, O, I, n_groups = 5, 144, 144, 3
    g, x, dW = make(N, O, I)
    mask = torch.zeros(O, I, device=DEVICE)
    if split == "out":
        mask[48:96, :] = 1
    else:
        mask[:, 48:96] = 1
    got = IMPL[impl](g, x, dW * mask, n_groups, split)
    assert torch.all(got[:, [0, 2]] == 0), "a group scored weights it does not own"
    assert torch.all(got[:, 1].abs() > 0)
    # The other split's grouping must not agree (the test above can tell them apart).
    other = IMPL[impl](g, x, dW * mask, n_groups, "in" if split == "out" else "out")
    assert not torch.all(other[:, [0, 2]] == 0)


def test_bad_arguments_raise():
    g, x, dW = make(4, 144, 100)
    with pytest.raises(ValueError, match="equal groups"):
        grad_delta(g, x, dW, 7, "out")                           # 144 rows do not split into 7
    with pytest.raises(ValueError, match="equal groups"):
        grad_delta(g, x, dW, 3, "in")                            # 100 columns do not split into 3
    with pytest.raises(ValueError, match="shapes disagree"):
        grad_delta(g, x, dW.T, 1, "out")
    with pytest.raises(ValueError, match="split"):
        grad_delta(g, x, dW, 1, "rows")
