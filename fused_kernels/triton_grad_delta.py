"""The Triton kernel of fused_kernels/grad_delta.py and its launch.

Imported only when the kernel launches (fused_kernels.grad_delta.grad_delta_triton), so that the project imports and
runs where Triton is not installed. What it fuses and what memory traffic it saves: fused_kernels/grad_delta.py.
"""
import torch
import triton
import triton.language as tl

from fused_kernels import backend


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


def launch(g, x, dW, n_groups, split):
    """grad_delta (fused_kernels/grad_delta.py) by the kernel, for shapes already checked there."""
    if split == "in":                                            # score_in(g, x, dW) = score_out(x, g, dW^T)
        g, x, dW = x, g, dW.t()                                  # dW.t() is a view: strides swap, no copy
    N, O = g.shape
    I = x.shape[1]
    group = O // n_groups                                        # rows of dW per group
    # 16-bit dot only when both operands share a 16-bit dtype. The CPU interpreter multiplies the raw bit
    # patterns of bf16 in tl.dot (triton-lang/triton#11584), so there we upcast: same values, bf16 products
    # are exact in fp32.
    fp32_inputs = not (x.dtype == dW.dtype and x.dtype in (torch.bfloat16, torch.float16))
    fp32_dot = backend.INTERPRET or fp32_inputs
    # True fp32 products run on the CUDA cores, each thread holding its rows of x and columns of dW^T over a
    # whole BLOCK_I: at 64 they spill 0.5 KB a thread on an A100, at 32 8 B on an H100 with Triton 3.7.1,
    # at 16 none (bench/offline_compile.py, Triton 3.7.1 and 3.9).
    BLOCK_N, BLOCK_O, BLOCK_I = _block(N, 64), _block(group, 64), _block(I, 16 if fp32_inputs else 64)
    n_blocks = triton.cdiv(group, BLOCK_O)                       # blocks of BLOCK_O rows per group
    part = torch.empty(N, n_groups, n_blocks, device=g.device, dtype=torch.float32)  # (N, n_groups, blocks)
    grid = (triton.cdiv(N, BLOCK_N), n_groups, n_blocks)
    with backend.on_device(g):                                   # g's GPU, not the current one
        _grad_delta_kernel[grid](g, x, dW, part, N, I, group, n_blocks,
                                 g.stride(0), g.stride(1), x.stride(0), x.stride(1), dW.stride(0), dW.stride(1),
                                 FP32_DOT=fp32_dot, BLOCK_N=BLOCK_N, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I)
    return part.sum(-1)                                          # (N, n_groups): add each group's blocks


