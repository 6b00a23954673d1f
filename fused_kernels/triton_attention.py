"""The Triton kernels of fused_kernels/attention.py (FlashAttention-2 forward and backward) and their launches.

Imported only when a kernel launches (fused_kernels.attention.attention_triton), so that the project imports and runs
where Triton is not installed. What the kernels fuse, and how they differ from the twin, is in the docstring
of fused_kernels/attention.py.
"""
import torch
import triton
import triton.language as tl

from fused_kernels import backend

# --- Triton kernels: helpers shared by the forward and backward passes -----------------------------

# @triton.jit decides when this module is imported whether it compiles for the GPU or runs in Triton's
# CPU interpreter (TRITON_INTERPRET=1); the same switch, read once in fused_kernels/backend.py, selects the
# workarounds in _dot and _cast.
_INTERPRETED = tl.constexpr(backend.INTERPRET)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. PRECISION "tf32x3" for fp32 inputs: three TF32 tensor-core products, about
    fp32's accuracy (the twin uses no TF32); ignored for 16-bit inputs."""
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

def tiles(E, dtype, capability):
    """Tile sizes and launch options {"fwd", "dkdv", "dq"}: (BLOCK_M, BLOCK_N, BLOCK_E, options) for each kernel
    (the delta kernel shares dq's BLOCK_M), for head dim E, input dtype and GPU generation (capability None: the
    interpreter, where only correctness matters). Chosen in TILES."""
    BLOCK_E = max(16, triton.next_power_of_2(E))                 # tl.arange and tl.dot need powers of 2, >= 16
    if BLOCK_E > 256:
        raise ValueError(f"head dim {E} > 256 has no tile configuration: call attention(), which sends it to "
                         "the torch twin")
    width = "fp32" if dtype == torch.float32 else "16-bit"
    # sm_90 and later: the H100's tiles; everything else the A100's (sm_86/89 allow 99 KB a block, which all
    # of them fit but the 16-bit E = 256 dK/dV tiles, 100 KB: not compiled for here).
    arch = 90 if capability is not None and capability[0] >= 9 else 80
    configs = TILES[width, max(64, BLOCK_E), arch]
    return {kernel: (BM, BN, BLOCK_E, dict(num_warps=warps, num_stages=stages))
            for kernel, (BM, BN, warps, stages) in zip(("fwd", "dkdv", "dq"), configs)}


# (dtype, BLOCK_E, sm) -> (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, dK/dV and dQ kernels.
# Chosen by compiling for sm_80 and sm_90 without a GPU (bench/offline_compile.py; the table is in
# bench/README.md): the largest tiles tried whose registers do not spill and whose shared memory (the q, k, v,
# dO tiles, times num_stages for those the loop prefetches) fits the A100's 163 KB or the H100's 227 KB.
# - fp32 pays for its three TF32 products with hi and lo halves of every operand in registers: small tiles.
#   The 16-bit tiles (64 x 64, 3 stages) at E = 128 ask for 193-225 KB and spill 6.5-14.5 KB a thread.
# - dK/dV keeps the most per program (k, v and their fp32 gradients for BLOCK_N keys): its tiles are smallest.
# - On sm_90 a dot becomes wgmma only if its M (BLOCK_M; dK/dV: BLOCK_N) is at least 64, hence the 16-bit
#   tiles' 64s. fp32 tiles of 16 run mma there.
# - fp32 E = 256 spilled in every configuration tried (8 B to 9.8 KB a thread in at least one of the three
#   kernels): attention() sends it to the twin;
#   the entry below serves direct calls of attention_triton only.
TILES = {
    ("fp32", 64, 80): ((32, 64, 8, 2), (16, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 64, 90): ((32, 64, 8, 2), (16, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 128, 80): ((16, 64, 8, 2), (16, 16, 8, 2), (16, 32, 8, 2)),
    ("fp32", 128, 90): ((16, 64, 8, 2), (16, 16, 8, 2), (16, 32, 8, 2)),
    ("fp32", 256, 80): ((16, 32, 8, 2), (16, 16, 8, 1), (16, 16, 8, 1)),
    ("fp32", 256, 90): ((16, 32, 8, 2), (16, 16, 8, 1), (16, 16, 8, 1)),
    # sm_80 with a soft-cap spilled 8-40 B at the sm_90 tiles (32, 64, 8, 2) and (64, 64, 4, 3)
    ("16-bit", 64, 80): ((64, 64, 4, 3), (32, 32, 4, 2), (64, 64, 8, 3)),
    ("16-bit", 64, 90): ((64, 64, 4, 3), (32, 64, 8, 2), (64, 64, 4, 3)),
    ("16-bit", 128, 80): ((64, 64, 8, 3), (32, 64, 8, 2), (64, 32, 8, 2)),
    ("16-bit", 128, 90): ((64, 64, 8, 3), (32, 64, 8, 2), (64, 32, 8, 2)),
    ("16-bit", 256, 80): ((64, 32, 8, 2), (32, 64, 8, 1), (64, 32, 8, 1)),
    ("16-bit", 256, 90): ((64, 32, 8, 2), (32, 64, 8, 1), (64, 16, 8, 2)),
}


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)                 # the kernels assume stride(3) == 1


class TritonAttention(torch.autograd.Function):
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
        # fp32: three TF32 tensor-core products per dot (tf32x3: a = a_hi + a_lo, dropping a_lo b_lo), about
        # fp32's accuracy (the twin uses no TF32); "ieee" would run on the CUDA cores, and holds whole rows of
        # q and k per thread: 32 registers and 7-15 KB of spills a thread at E = 128. 16-bit: plain tensor cores.
        precision = "tf32x3" if q.dtype == torch.float32 else "tf32"   # tf32 only names the default for 16-bit
        BM, BN, BE, launch = tiles(E, q.dtype, backend.capability(q))["fwd"]
        o = torch.empty_like(q)                                  # same strides as q
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        with backend.on_device(q):
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
        cfg = tiles(E, q.dtype, backend.capability(q))
        delta = torch.empty_like(lse)                            # (B, H, T) fp32
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        with backend.on_device(q):
            BM, _, BE, _ = cfg["dq"]
            _delta_kernel[(triton.cdiv(T, BM), B * H)](o, do, delta, T, H, E, *_strides(o), *_strides(do),
                                                       BLOCK_M=BM, BLOCK_E=BE)
            BM, BN, BE, launch = cfg["dkdv"]
            _dkdv_kernel[(triton.cdiv(T, BN), B * K)](
                q, k, v, do, lse, delta, mask, dk, dv, scale, T, window, H, H // K, E,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                SOFTCAP=softcap, PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_E=BE, **launch)
            BM, BN, BE, launch = cfg["dq"]
            _dq_kernel[(triton.cdiv(T, BM), B * H)](
                q, k, v, do, lse, delta, mask, dq, scale, T, window, H, H // K, E,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                SOFTCAP=softcap, PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_E=BE, **launch)
        return dq, dk, dv, None, None, None, None
