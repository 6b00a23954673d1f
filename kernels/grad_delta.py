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

No backward: the score is a measurement, never differentiated.
"""
import os

import torch
import triton
import triton.language as tl


# --- torch twin: the reference definition -----------------------------------------------------------

def grad_delta_torch(g, x, dW, n_groups, split):
    N = g.shape[0]
    g, x, dW = g.float(), x.float(), dW.float()                   # accumulate in fp32
    if split == "out":
        per_unit = g * (x @ dW.T)                                 # (N, O): g[n, o] * (dW x_n)[o]
    else:
        per_unit = (g @ dW) * x                                   # (N, I): (g_n dW)[i] * x[n, i]
    return per_unit.view(N, n_groups, -1).sum(-1)                # (N, n_groups): sum inside each group


# --- Triton kernel ----------------------------------------------------------------------------------
# Written for split="out". Program (pn, j, c) owns positions [pn*BLOCK_N, +BLOCK_N) and the c-th block of
# BLOCK_O rows inside group j; rows past the group's end are masked, so any group width works. It writes
# one partial sum per (position, group, block); the wrapper adds the few blocks of each group.

@triton.jit
def _grad_delta_kernel(g_ptr, x_ptr, w_ptr, part_ptr,
                       N, I, GROUP, N_BLOCKS_PER_GROUP,
                       stride_gn, stride_go, stride_xn, stride_xi, stride_wo, stride_wi,
                       FP32_DOT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_n, j, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                  # (BLOCK_N,) positions
    o_in_group = c * BLOCK_O + tl.arange(0, BLOCK_O)             # (BLOCK_O,) rows, counted inside group j
    o = j * GROUP + o_in_group                                   # (BLOCK_O,) rows of dW
    n_mask = n < N
    o_mask = o_in_group < GROUP                                  # never spill into the next group

    # acc[n, o] = (dW x_n)[o] for this tile, summed over blocks of I; fp32 registers, never stored.
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)                           # (BLOCK_I,)
        i_mask = i < I
        x_tile = tl.load(x_ptr + n[:, None] * stride_xn + i[None, :] * stride_xi,
                         mask=n_mask[:, None] & i_mask[None, :], other=0.0)      # (BLOCK_N, BLOCK_I)
        w_tile = tl.load(w_ptr + o[None, :] * stride_wo + i[:, None] * stride_wi,
                         mask=o_mask[None, :] & i_mask[:, None], other=0.0)      # (BLOCK_I, BLOCK_O) = dW^T
        if FP32_DOT:
            # fp32 (or mixed) inputs: true fp32 products, like torch's default matmul, not TF32.
            acc = tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            # bf16/fp16 inputs: the products are exact in fp32, the sum accumulates in fp32.
            acc = tl.dot(x_tile, w_tile, acc)

    # eq. 4/7: multiply by the gradient at the output and reduce over this block's rows of group j.
    g_tile = tl.load(g_ptr + n[:, None] * stride_gn + o[None, :] * stride_go,
                     mask=n_mask[:, None] & o_mask[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_O)
    part = tl.sum(acc * g_tile, axis=1)                          # (BLOCK_N,); masked rows add 0
    n_groups = tl.num_programs(1)
    tl.store(part_ptr + (n * n_groups + j) * N_BLOCKS_PER_GROUP + c, part, mask=n_mask)


def _block(width, cap):
    # A power of two for tl.arange, at least 16 (tl.dot's smallest tile), at most cap.
    return max(16, min(cap, triton.next_power_of_2(width)))


def grad_delta_triton(g, x, dW, n_groups, split):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not g.is_cuda and not interpreting:
        raise RuntimeError("the Triton kernel needs CUDA tensors; on CPU set TRITON_INTERPRET=1 before "
                           "importing triton, or use impl='torch'")
    if split == "in":                                            # score_in(g, x, dW) = score_out(x, g, dW^T)
        g, x, dW = x, g, dW.t()                                  # dW.t() is a view: strides swap, no copy
    N, O = g.shape
    I = x.shape[1]
    group = O // n_groups                                        # rows of dW per group
    BLOCK_N, BLOCK_O, BLOCK_I = _block(N, 64), _block(group, 64), _block(I, 64)
    n_blocks = triton.cdiv(group, BLOCK_O)                       # blocks of BLOCK_O rows per group
    part = torch.empty(N, n_groups, n_blocks, device=g.device, dtype=torch.float32)  # (N, n_groups, blocks)
    # 16-bit dot only when both operands share a 16-bit dtype. The CPU interpreter multiplies the raw bit
    # patterns of bf16 in tl.dot (triton-lang/triton#11584), so there we upcast: same values, bf16 products
    # are exact in fp32.
    fp32_dot = interpreting or not (x.dtype == dW.dtype and x.dtype in (torch.bfloat16, torch.float16))
    grid = (triton.cdiv(N, BLOCK_N), n_groups, n_blocks)
    _grad_delta_kernel[grid](g, x, dW, part, N, I, group, n_blocks,
                             g.stride(0), g.stride(1), x.stride(0), x.stride(1), dW.stride(0), dW.stride(1),
                             FP32_DOT=fp32_dot, BLOCK_N=BLOCK_N, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I)
    return part.sum(-1)                                          # (N, n_groups): add each group's blocks


# --- dispatch: one place checks the shapes and chooses the implementation ---------------------------

def grad_delta(g, x, dW, n_groups, split, impl="auto"):
    """Informative score of each group of a linear map's weights at each position (eq. 4/7), fp32 (N, n_groups).

    g: (N, O) dR/dy at the map's output, x: (N, I) its input, dW: (O, I) = W' - W. split "out" groups the
    rows of dW (q/k/v heads), "in" its columns (o_proj heads). impl: "auto" (Triton kernel on CUDA tensors,
    torch twin elsewhere), "triton" or "torch".
    """
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
    if impl == "auto":
        impl = "triton" if g.is_cuda else "torch"
    if impl == "torch":
        return grad_delta_torch(g, x, dW, n_groups, split)
    if impl == "triton":
        return grad_delta_triton(g, x, dW, n_groups, split)
    raise ValueError(f'impl must be "auto", "triton" or "torch", got {impl!r}')
