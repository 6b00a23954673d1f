"""Causal attention with grouped-query heads, soft-capping, a sliding window and right padding.

attention(q, k, v) computes, for every query head h and position t,
    o[h, t] = sum_s softmax_s(cap(scale * q[h, t] . k[h // G, s]) + mask[t, s]) v[h // G, s]
with G = H / K query heads sharing each key/value head (grouped-query attention), cap the Gemma 2
soft-cap `softcap * tanh(x / softcap)`, and mask allowing s <= t, t - s < window, and real (unpadded) keys.

Shapes: B batch, H query heads, K key/value heads, T positions, E head dim.

The torch twin (`attention_torch`) is the definition; the Triton kernel (fused_kernels/triton_attention.py, imported
only when it launches, so that machines without Triton run the twin) must match it. `attention` picks one of
the two through fused_kernels/backend.py: the kernel for CUDA tensors it takes (kernel_takes), the twin otherwise.

What the kernel fuses (FlashAttention-2, Dao 2023): scores, soft-cap, masks, softmax and the product with V,
one tile of BLOCK_M queries at a time, with an online softmax over tiles of BLOCK_N keys. The twin writes
the (B, H, T, T) fp32 scores and probabilities to memory and reads them back (and keeps them for the
backward pass); the kernel keeps them in registers, so its memory traffic and its saved state are
O(B H T E) instead of O(B H T^2): it reads q, k, v and writes o plus one fp32 log-sum-exp per query row.
Tiles of keys above the causal diagonal or outside the window are skipped, not masked. The backward
pass recomputes the probabilities from the saved log-sum-exp: one small kernel for delta = rowsum(dO * O),
one for dK and dV (a program per key tile loops over the G query heads that share it, so GQA needs no
copies of k or v, nor atomics), one for dQ. The kernels read any strides (the model passes transposed views).

Rows with no visible key (a padded query further than `window` from every real key) differ: the twin gives
them a uniform average over all T values (it masks with finfo.min), the kernel gives zeros and zero gradients.
No real token has such a row; the loss must ignore padded positions anyway.
"""
import torch

from fused_kernels import backend

# What the kernel takes (fused_kernels/triton_attention.py; compiled for each in tests/test_gpu_compile.py); fp64
# and the rest go to the twin. The model sends fp32 and bf16; fp16 shares bf16's tiles.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_takes(q):
    """Inputs that attention() sends to the kernel on CUDA: its dtypes and head dims up to 256, except fp32 with
    E > 128 (Gemma 2), whose tiles spill registers however small (fused_kernels/triton_attention.py, TILES)."""
    E = q.shape[-1]
    return q.dtype in KERNEL_DTYPES and E <= (128 if q.dtype == torch.float32 else 256)


# --- torch twin: the reference definition ---------------------------------------------------------

def attention_torch(q, k, v, *, scale, softcap=None, window=None, attention_mask=None):
    with torch.autocast(q.device.type, enabled=False):          # bf16 training: the scores still in fp32
        B, H, T, E = q.shape
        K = k.shape[1]
        G = H // K                                               # query heads per key/value head
        acc = torch.promote_types(q.dtype, torch.float32)        # fp32 at least (fp64 stays fp64 for tests)
        # Query head h = j G + g reads key/value head j: as (B, K, G T, E), one matmul per key/value head
        # covers its G query heads, with no copies of k or v.
        qg = q.reshape(B, K, G * T, E).to(acc)
        s = (qg @ k.to(acc).transpose(-1, -2)).view(B, K, G, T, T) * scale   # (B, K, G, T, T) fp32
        if softcap is not None:                                  # Gemma 2: soft-capped attention logits
            s = softcap * torch.tanh(s / softcap)
        t = torch.arange(T, device=q.device)
        allowed = t[None, :] <= t[:, None]                       # (T, T): causal, key s <= query t
        if window is not None:                                   # sliding window: t - s < window
            allowed = allowed & (t[:, None] - t[None, :] < window)
        allowed = allowed[None, None, None]                      # (1, 1, 1, T, T)
        if attention_mask is not None:                           # (B, T): 1 for real tokens, 0 for padding
            allowed = allowed & attention_mask.bool()[:, None, None, None, :]
        # A large finite negative rather than -inf: a query with no visible key (padding past a window)
        # gets a harmless uniform average instead of NaN.
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1)                             # fp32 softmax
        o = backend.matmul(p.to(v.dtype).view(B, K, G * T, T), v)   # (B, K, G T, E)
        return o.view(B, H, T, E)


# --- the Triton kernel's wrapper ---------------------------------------------------------------------

def attention_triton(q, k, v, *, scale, softcap=None, window=None, attention_mask=None):
    B, H, T, E = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, E) or H % k.shape[1]:
        raise ValueError(f"expected q (B, H, T, E) and k, v (B, K, T, E) with K dividing H; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    backend.check_kernel_inputs("attention", KERNEL_DTYPES, q, k, v)
    from fused_kernels.triton_attention import TritonAttention     # imports Triton: only when a kernel launches
    return TritonAttention.apply(q, k, v, scale, softcap, window, attention_mask)


# --- dispatch: one place chooses the implementation -------------------------------------------------

def attention(q, k, v, *, scale, softcap=None, window=None, attention_mask=None):
    """The Triton kernel for CUDA tensors it takes, the torch twin otherwise (fused_kernels/backend.py)."""
    impl = attention_triton if backend.use_triton(q, kernel_takes(q)) else attention_torch
    return impl(q, k, v, scale=scale, softcap=softcap, window=window, attention_mask=attention_mask)
