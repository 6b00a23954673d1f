"""Causal attention with grouped-query heads, soft-capping, a sliding window and right padding.

attention(q, k, v) computes, for every query head h and position t,
    o[h, t] = sum_s softmax_s(cap(scale * q[h, t] . k[h // G, s]) + mask[t, s]) v[h // G, s]
with G = H / K query heads sharing each key/value head (grouped-query attention), cap the Gemma 2
soft-cap `softcap * tanh(x / softcap)`, and mask allowing s <= t, t - s < window, and real (unpadded) keys.

Shapes: B batch, H query heads, K key/value heads, T positions, E head dim.

The torch twin (`attention_torch`) is the definition; the Triton kernel (added beside it) must match it.
`attention` picks one of the two in one place: the kernel for CUDA tensors, the twin otherwise.
"""
import torch


# --- torch twin: the reference definition ---------------------------------------------------------

def attention_torch(q, k, v, *, scale, softcap=None, window=None, attention_mask=None):
    B, H, T, E = q.shape
    K = k.shape[1]
    G = H // K                                                   # query heads per key/value head
    qg = q.view(B, K, G, T, E)                                   # (B, K, G, T, E): no copy of k/v
    s = torch.einsum("bkgte,bkse->bkgts", qg.float(), k.float()) * scale   # (B, K, G, T, T) fp32
    if softcap is not None:                                      # Gemma 2: soft-capped attention logits
        s = softcap * torch.tanh(s / softcap)
    t = torch.arange(T, device=q.device)
    allowed = t[None, :] <= t[:, None]                           # (T, T): causal, key s <= query t
    if window is not None:                                       # sliding window: t - s < window
        allowed = allowed & (t[:, None] - t[None, :] < window)
    allowed = allowed[None, None, None]                          # (1, 1, 1, T, T)
    if attention_mask is not None:                               # (B, T): 1 for real tokens, 0 for padding
        allowed = allowed & attention_mask.bool()[:, None, None, None, :]
    # A large finite negative rather than -inf: a query with no visible key (padding past a window)
    # gets a harmless uniform average instead of NaN.
    s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)                                 # fp32 softmax
    o = torch.einsum("bkgts,bkse->bkgte", p.to(v.dtype), v)      # (B, K, G, T, E)
    return o.reshape(B, H, T, E)


# --- dispatch: one place chooses the implementation -------------------------------------------------

def attention(q, k, v, *, scale, softcap=None, window=None, attention_mask=None, impl="auto"):
    """impl: "auto" (Triton kernel on CUDA, torch twin elsewhere), "triton" or "torch"."""
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return attention_torch(q, k, v, scale=scale, softcap=softcap, window=window,
                               attention_mask=attention_mask)
    raise NotImplementedError("the Triton attention kernel is not written yet")
