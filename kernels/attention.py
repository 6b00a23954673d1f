"""Causal attention with grouped-query heads, soft-capping, a sliding window and right padding.

attention(q, k, v) computes, for every query head h and position t,
    o[h, t] = sum_s softmax_s(cap(scale * q[h, t] . k[h // G, s]) + mask[t, s]) v[h // G, s]
with G = H / K query heads sharing each key/value head (grouped-query attention), cap the Gemma 2
soft-cap `softcap * tanh(x / softcap)`, and mask allowing s <= t, t - s < window, and real (unpadded) keys.

Shapes: B batch, H query heads, K key/value heads, T positions, E head dim.

The torch twin (`attention_torch`) is the definition; the Triton kernel beside it must match it.
`attention` picks one of the two in one place: the kernel for CUDA tensors, the twin otherwise.

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
import triton
import triton.language as tl


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
        o = p.to(v.dtype).view(B, K, G * T, T) @ v               # (B, K, G T, E)
        return o.view(B, H, T, E)


# --- Triton kernels: helpers shared by the forward and backward passes -----------------------------

# @triton.jit decides when this module is imported whether it compiles for the GPU or runs in Triton's
# CPU interpreter (TRITON_INTERPRET=1); read the same switch once, for the workarounds in _dot and _cast.
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. PRECISION "ieee" for fp32 inputs (no TF32: the twin uses none)."""
    if _INTERPRETED:   # the interpreter (Triton 3.9) multiplies bf16 tiles as raw uint16 bits; fp32 is exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 x in dtype, rounded to nearest even as on the GPU."""
    if _INTERPRETED:   # the interpreter truncates fp32 to bf16: round the fp32 bits first (then exact)
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _scores(q, k, offs_m, offs_n, key_real, T, scale, window,
            SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of a (BLOCK_M queries, BLOCK_N keys) tile: capped s, tanh (for the backward), visibility."""
    s = _dot(q, tl.trans(k), PRECISION) * scale                  # (BLOCK_M, BLOCK_N) fp32
    th = s                                                       # unused without a soft-cap
    if SOFTCAP > 0:                                              # Gemma 2: softcap * tanh(s / softcap)
        th = 2 * tl.sigmoid(2 * s / SOFTCAP) - 1                 # tanh; tl has no tanh of its own
        s = SOFTCAP * th
    t, j = offs_m[:, None], offs_n[None, :]
    visible = (j <= t) & (t - j < window) & (key_real[None, :] != 0) & (t < T)   # causal, window, padding
    return s, th, visible


@triton.jit
def _key_range(start_m, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles a query tile can see: none above the diagonal, none wholly before the window."""
    lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M, T)
    return lo, hi


# --- forward: online softmax over key tiles ---------------------------------------------------------
# Pointer arguments are named after their tensors (Q, ..., DO for dO); s<tensor><dim> are strides in
# elements, e.g. sqt = q.stride(2), the step from one position to the next; the head dim's stride is 1.

@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, MASK, scale, T, window, H, G, E,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M                         # one program: BLOCK_M queries of one head
    bh = tl.program_id(1).to(tl.int64)                           # int64: offsets may pass 2**31
    b, h = bh // H, bh % H
    kh = h // G                                                  # GQA: this head's key/value head
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)                               # E padded to a power of two
    e_ok = offs_e[None, :] < E
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_e[None, :],
                mask=(offs_m[:, None] < T) & e_ok, other=0.0)    # (BLOCK_M, BLOCK_E)
    k_base, v_base = K + b * skb + kh * skh, V + b * svb + kh * svh
    # Running max, running sum of exp and unnormalized output, all fp32. The max starts finite so that
    # a tile with nothing visible yet gives exp(-inf - m) = 0, never exp(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    lo, hi = _key_range(start_m, T, window, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n
        kv_mask = (n[:, None] < T) & e_ok
        k = tl.load(k_base + n[:, None] * skt + offs_e[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_E)
        v = tl.load(v_base + n[:, None] * svt + offs_e[None, :], mask=kv_mask, other=0.0)
        key_real = tl.load(MASK + b * T + n, mask=n < T, other=0)  # (BLOCK_N,): 0 past T and for padding
        s, th, visible = _scores(q, k, offs_m, n, key_real, T, scale, window, SOFTCAP, PRECISION)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)                              # rescales what was summed so far
        p = tl.exp(s - m_new[:, None])                           # (BLOCK_M, BLOCK_N) fp32
        l_i = l_i * alpha + tl.sum(p, 1)
        # The twin rounds p to v's dtype before the product with v; so does the kernel.
        acc = acc * alpha[:, None] + _dot(_cast(p, V.dtype.element_ty), v, PRECISION)
        m_i = m_new
    seen = l_i > 0                                               # rows with a visible key
    o = acc / tl.where(seen, l_i, 1.0)[:, None]                  # the others: o = 0
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_e[None, :],
             _cast(o, O.dtype.element_ty), mask=(offs_m[:, None] < T) & e_ok)
    # Log-sum-exp per row, (B, H, T) fp32; +inf for the empty rows makes their recomputed p exactly 0.
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh * T + offs_m, lse, mask=offs_m < T)


# --- backward: probabilities recomputed from the log-sum-exp ---------------------------------------
# With p = softmax(s) and s = cap(scale * q . k): dV = p^T dO, dp = dO V^T,
# ds = p * (dp - delta) with delta = rowsum(p * dp) = rowsum(dO * O), and through the cap
# d cap(x)/dx = 1 - tanh^2; then dQ = scale * ds K and dK = scale * ds^T Q.

@triton.jit
def _delta_kernel(O, DO, DELTA, T, H, E, sob, soh, sot, sdob, sdoh, sdot,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    ok = (offs_m[:, None] < T) & (offs_e[None, :] < E)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_e[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_e[None, :], mask=ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)      # (BLOCK_M,) fp32
    tl.store(DELTA + bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, MASK, DK, DV, scale, T, window, H, G, E,
                 sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                 sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                 SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N                         # one program: BLOCK_N keys of one kv head
    bk = tl.program_id(1).to(tl.int64)
    nK = H // G
    b, kh = bk // nK, bk % nK
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e[None, :] < E
    kv_mask = (offs_n[:, None] < T) & e_ok
    k = tl.load(K + b * skb + kh * skh + offs_n[:, None] * skt + offs_e[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kh * svh + offs_n[:, None] * svt + offs_e[None, :], mask=kv_mask, other=0.0)
    key_real = tl.load(MASK + b * T + offs_n, mask=offs_n < T, other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    # Query tiles that can see these keys: from the diagonal down to `window` rows below the last key.
    lo = start_n // BLOCK_M * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N - 1 + window, T)
    for g in range(G):                                           # GQA: sum over the group's query heads
        h = kh * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        for start_m in range(lo, hi, BLOCK_M):
            m = start_m + offs_m
            row_mask = (m[:, None] < T) & e_ok
            q = tl.load(q_base + m[:, None] * sqt + offs_e[None, :], mask=row_mask, other=0.0)
            do = tl.load(do_base + m[:, None] * sdot + offs_e[None, :], mask=row_mask, other=0.0)
            lse = tl.load(LSE + (b * H + h) * T + m, mask=m < T, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * T + m, mask=m < T, other=0.0)
            s, th, visible = _scores(q, k, m, offs_n, key_real, T, scale, window, SOFTCAP, PRECISION)
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N) fp32
            dv += _dot(tl.trans(_cast(p, DO.dtype.element_ty)), do, PRECISION)
            dp = _dot(do, tl.trans(v), PRECISION)                # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            if SOFTCAP > 0:
                ds = ds * (1 - th * th)
            dk += _dot(tl.trans(_cast(ds, Q.dtype.element_ty)), q, PRECISION)
    dk = dk * scale
    tl.store(DK + b * sdkb + kh * sdkh + offs_n[:, None] * sdkt + offs_e[None, :],
             _cast(dk, DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + kh * sdvh + offs_n[:, None] * sdvt + offs_e[None, :],
             _cast(dv, DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, MASK, DQ, scale, T, window, H, G, E,
               sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
               SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M                         # one program: BLOCK_M queries of one head
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kh = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e[None, :] < E
    row_mask = (offs_m[:, None] < T) & e_ok
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_e[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_e[None, :], mask=row_mask, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    k_base, v_base = K + b * skb + kh * skh, V + b * svb + kh * svh
    dq = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    lo, hi = _key_range(start_m, T, window, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n
        kv_mask = (n[:, None] < T) & e_ok
        k = tl.load(k_base + n[:, None] * skt + offs_e[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * svt + offs_e[None, :], mask=kv_mask, other=0.0)
        key_real = tl.load(MASK + b * T + n, mask=n < T, other=0)
        s, th, visible = _scores(q, k, offs_m, n, key_real, T, scale, window, SOFTCAP, PRECISION)
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP > 0:
            ds = ds * (1 - th * th)
        dq += _dot(_cast(ds, K.dtype.element_ty), k, PRECISION)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_e[None, :],
             _cast(dq, DQ.dtype.element_ty), mask=row_mask)


# --- wrapper: launches and autograd ----------------------------------------------------------------

def _config(E):
    """Tile sizes and launch options for head dim E. 64 x 64 tiles fit E <= 128. For E = 256 (Gemma 2),
    32 x 32 tiles and two pipeline stages, so that a program's q, k, v, dO tiles (and their prefetched next
    ones) still fit in shared memory and its fp32 accumulators in registers."""
    BLOCK_E = max(16, triton.next_power_of_2(E))                # tl.arange and tl.dot need powers of 2, >= 16
    if BLOCK_E <= 128:
        return 64, 64, BLOCK_E, dict(num_warps=4 if BLOCK_E <= 64 else 8)
    return 32, 32, BLOCK_E, dict(num_warps=8, num_stages=2)


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)                 # the kernels assume stride(3) == 1


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, softcap, window, attention_mask):
        B, H, T, E = q.shape
        K = k.shape[1]
        # Any strides over (B, H, T); only the head dim must be contiguous, else copy (rare: the model's
        # transposed views of (B, T, H, E) already are).
        q, k, v = (x if x.stride(3) == 1 else x.contiguous() for x in (q, k, v))
        mask = (torch.ones(B, T, dtype=torch.int32, device=q.device) if attention_mask is None
                else attention_mask.to(torch.int32).contiguous())                     # (B, T)
        window = T if window is None else min(int(window), T)   # t - s < T always: no window
        softcap = 0.0 if softcap is None else float(softcap)     # 0: no soft-cap (a compile-time switch)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"   # tf32 only names the default for 16-bit
        BM, BN, BE, launch = _config(E)
        o = torch.empty_like(q)                                  # same strides as q
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        _fwd_kernel[(triton.cdiv(T, BM), B * H)](
            q, k, v, o, lse, mask, scale, T, window, H, H // K, E,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            SOFTCAP=softcap, PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_E=BE, **launch)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.args = (scale, softcap, window, precision)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        scale, softcap, window, precision = ctx.args
        B, H, T, E = q.shape
        K = k.shape[1]
        do = do if do.stride(3) == 1 else do.contiguous()
        BM, BN, BE, launch = _config(E)
        delta = torch.empty_like(lse)                            # (B, H, T) fp32
        _delta_kernel[(triton.cdiv(T, BM), B * H)](o, do, delta, T, H, E, *_strides(o), *_strides(do),
                                                   BLOCK_M=BM, BLOCK_E=BE)
        common = dict(SOFTCAP=softcap, PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_E=BE, **launch)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _dkdv_kernel[(triton.cdiv(T, BN), B * K)](
            q, k, v, do, lse, delta, mask, dk, dv, scale, T, window, H, H // K, E,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), **common)
        _dq_kernel[(triton.cdiv(T, BM), B * H)](
            q, k, v, do, lse, delta, mask, dq, scale, T, window, H, H // K, E,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), **common)
        return dq, dk, dv, None, None, None, None


def attention_triton(q, k, v, *, scale, softcap=None, window=None, attention_mask=None):
    B, H, T, E = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, E) or H % k.shape[1]:
        raise ValueError(f"expected q (B, H, T, E) and k, v (B, K, T, E) with K dividing H; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.is_cuda and not _INTERPRETED:
        raise RuntimeError("the Triton attention kernel needs CUDA tensors, or Triton's CPU interpreter: "
                           "set TRITON_INTERPRET=1 before importing kernels.attention, or use impl='torch'")
    return _TritonAttention.apply(q, k, v, scale, softcap, window, attention_mask)


# --- dispatch: one place chooses the implementation -------------------------------------------------

def attention(q, k, v, *, scale, softcap=None, window=None, attention_mask=None, impl="auto"):
    """impl: "auto" (Triton kernel on CUDA, torch twin elsewhere), "triton" or "torch"."""
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "torch":
        return attention_torch(q, k, v, scale=scale, softcap=softcap, window=window,
                               attention_mask=attention_mask)
    if impl == "triton":
        return attention_triton(q, k, v, scale=scale, softcap=softcap, window=window,
                                attention_mask=attention_mask)
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
