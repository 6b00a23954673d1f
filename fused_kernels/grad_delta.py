"""Per-position gradient-times-delta: the linearized informative score of one linear map (paper eq. 4/7).

For a linear map y = W x (+ b) at weights W and a weight change dW = W' - W, the first-order change of the
reward R at position n through this map is g_n . (dW x_n), with x_n the map's input and g_n = dR/dy_n the
gradient at its output (eq. 4; eq. 7 is the same product per token position). A component owns a group of
the map's weights, and its score is the group's share of that dot product:

    split="out": score[n, j] = sum_{o in group j} g[n, o] * (dW x_n)[o]     q/k/v: a head owns rows of dW
    split="in":  score[n, j] = sum_{i in group j} (g_n dW)[i] * x[n, i]     o_proj: a head owns columns
    n_groups=1:  score[n, 0] = g_n . dW x_n                                 an MLP's gate/up/down: one group

Groups are contiguous and equal: group j of a width-W dimension is [j * W/n_groups, (j + 1) * W/n_groups).
Shapes: N positions (prompts x tokens, flattened), O the map's output width, I its input width.

What the kernel fuses: the matmul x dW^T, the multiplication by g, and the reduction over each group's rows,
in one pass. The torch twin writes the (N, O) product dW x_n for all positions to global memory, reads it
back to multiply by g, and reads the (N, O) result again to reduce it. The kernel keeps a (BLOCK_N, BLOCK_O)
tile of x dW^T in fp32 registers, accumulated over blocks of I with tl.dot, multiplies it by the g tile and
reduces it on the spot; only a (N, O / BLOCK_O) buffer of block partial sums ever reaches memory (summed by
the wrapper: deterministic, no atomics). For a 7B model's gate_proj (N = 20 prompts x 20 positions,
O = 14336, I = 4096) that saves an N x O fp32 write and its reads per map, and the twin's fp32 copy of dW;
the reduction stays one pass over dW. split="in" is the same computation on the transposed problem,
score_in(g, x, dW) = score_out(x, g, dW^T): the wrapper swaps the roles and passes dW^T as a strided view,
so there is one kernel and no copy.

No backward: the score is a measurement, never differentiated. The Triton kernel lives in
fused_kernels/triton_grad_delta.py, imported only when it launches, so that machines without Triton run the twin.
"""
import torch

from fused_kernels import backend

# What the kernel takes (fused_kernels/triton_grad_delta.py; compiled for these in tests/test_gpu_compile.py). g, x and
# dW may differ (fp32 dW with bf16 activations); fp64 and the rest go to the twin.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- torch twin: the reference definition -----------------------------------------------------------

def grad_delta_torch(g, x, dW, n_groups, split):
    N = g.shape[0]
    g, x, dW = g.float(), x.float(), dW.float()                   # accumulate in fp32
    if split == "out":
        per_unit = g * (x @ dW.T)                                 # (N, O): g[n, o] * (dW x_n)[o]
    else:
        per_unit = (g @ dW) * x                                   # (N, I): (g_n dW)[i] * x[n, i]
    return per_unit.view(N, n_groups, -1).sum(-1)                # (N, n_groups): sum inside each group


# --- the Triton kernel's wrapper ---------------------------------------------------------------------

def grad_delta_triton(g, x, dW, n_groups, split):
    check_arguments(g, x, dW, n_groups, split)
    backend.check_kernel_inputs("grad_delta", KERNEL_DTYPES, g, x, dW)
    from fused_kernels.triton_grad_delta import launch                 # imports Triton: only when a kernel launches
    return launch(g, x, dW, n_groups, split)


# --- dispatch: one place checks the shapes and chooses the implementation ---------------------------

def check_arguments(g, x, dW, n_groups, split):
    """Errors that say what is wrong, before either implementation runs."""
    if g.dim() != 2 or x.dim() != 2 or dW.dim() != 2:
        raise ValueError(f"expected g (N, O), x (N, I), dW (O, I); got {tuple(g.shape)}, {tuple(x.shape)}, "
                         f"{tuple(dW.shape)}: flatten batch and positions into N first")
    (N, O), (O_w, I) = g.shape, dW.shape
    if x.shape[0] != N or (O_w, I) != (O, x.shape[1]):
        raise ValueError(f"shapes disagree: g {tuple(g.shape)} (N, O), x {tuple(x.shape)} (N, I), "
                         f"dW {tuple(dW.shape)} (O, I)")
    if split not in ("out", "in"):
        raise ValueError(f'split must be "out" (groups of dW rows: q/k/v) or "in" (columns: o_proj), '
                         f'got {split!r}')
    width = O if split == "out" else I
    if n_groups < 1 or width % n_groups:
        raise ValueError(f"split={split!r} divides width {width} into {n_groups} equal groups, which is "
                         f"impossible: check n_groups (heads, or kv heads for k/v under GQA)")


def grad_delta(g, x, dW, n_groups, split):
    """Informative score of each group of a linear map's weights at each position (eq. 4/7), fp32 (N, n_groups).

    g: (N, O) dR/dy at the map's output, x: (N, I) its input, dW: (O, I) = W' - W. split "out" groups the
    rows of dW (q/k/v heads), "in" its columns (o_proj heads). The Triton kernel for CUDA tensors of dtypes
    it takes, the torch twin otherwise (fused_kernels/backend.py).
    """
    check_arguments(g, x, dW, n_groups, split)
    takes = all(t.dtype in KERNEL_DTYPES for t in (g, x, dW))
    return (grad_delta_triton if backend.use_triton(g, takes) else grad_delta_torch)(g, x, dW, n_groups, split)
