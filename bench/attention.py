"""Benchmark: our Triton attention kernel (fused_kernels/attention.py) against torch's scaled_dot_product_attention.

Causal grouped-query attention at growing T: forward, and forward plus backward, time (median of repeated
runs) and peak memory, printed as ratios ours / sdpa (below 1: ours is faster, or needs less). The first
column checks that both compute the same thing. Plain causal attention only: sdpa has no soft-cap, and a
sliding window would need an explicit (T, T) mask, which takes it off its fused kernels.

    python bench/attention.py                           # B=1, H=32, K=8, E=128 (a 7B-class model), bf16
    python bench/attention.py --head-dim 256 --seq-lens 1024 4096 --sdpa-kv expand

Needs a CUDA GPU; without one it says so and exits.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for fused_kernels/
from fused_kernels.attention import attention_triton  # noqa: E402


def peak_mib(fn):
    """Memory allocated by fn beyond what existed before it, at its peak, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_one(T, args, dtype):
    from triton.testing import do_bench
    B, H, K, E = args.batch, args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, E, device="cuda", dtype=dtype, generator=gen).requires_grad_()   # (B, H, T, E)
    k = torch.randn(B, K, T, E, device="cuda", dtype=dtype, generator=gen).requires_grad_()   # (B, K, T, E)
    v = torch.randn(B, K, T, E, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    do = torch.randn(B, H, T, E, device="cuda", dtype=dtype, generator=gen)
    scale = E ** -0.5

    def ours():
        return attention_triton(q, k, v, scale=scale)

    def sdpa():
        if args.sdpa_kv == "expand":              # copies of k and v for every query head, inside the timing
            G = H // K
            return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                  is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    row = {"T": T}
    with torch.no_grad():
        row["max|diff|"] = (ours().float() - sdpa().float()).abs().max().item()
    for name, fn in (("ours", ours), ("sdpa", sdpa)):
        fwd = lambda: fn()                                            # noqa: E731
        fwd_bwd = lambda: torch.autograd.grad(fn(), (q, k, v), do)    # noqa: E731
        with torch.no_grad():
            row[f"fwd {name}"] = do_bench(fwd, warmup=args.warmup, rep=args.rep, return_mode="median")
            row[f"fwd mem {name}"] = peak_mib(fwd)
        row[f"f+b {name}"] = do_bench(fwd_bwd, warmup=args.warmup, rep=args.rep, return_mode="median")
        row[f"f+b mem {name}"] = peak_mib(fwd_bwd)
    return row


def main():
    p = argparse.ArgumentParser(description="Time and peak memory of our Triton attention vs torch sdpa "
                                "(causal, grouped-query), as ratios ours / sdpa.")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                   help="sequence lengths T to measure")
    p.add_argument("--batch", type=int, default=1, help="B, sequences per batch")
    p.add_argument("--heads", type=int, default=32, help="H, query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="K, key/value heads (must divide H)")
    p.add_argument("--head-dim", type=int, default=128, help="E, head dimension (Gemma 2: 256)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="input dtype")
    p.add_argument("--sdpa-kv", choices=["gqa", "expand"], default="gqa",
                   help="how sdpa gets grouped k/v: enable_gqa=True, or repeat_interleave copies")
    p.add_argument("--warmup", type=int, default=25, help="warm-up time per measurement, ms (do_bench)")
    p.add_argument("--rep", type=int, default=100, help="measuring time per measurement, ms (do_bench)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/attention.py: no CUDA device found; this benchmark needs a GPU, nothing to do.")
        return
    if args.heads % args.kv_heads:
        p.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; settings: {vars(args)}")

    cols = ["T", "max|diff|", "fwd ours", "fwd sdpa", "fwd x", "f+b ours", "f+b sdpa", "f+b x",
            "fwd mem x", "f+b mem x"]
    print("times in ms; x = ours / sdpa (time, or peak memory beyond the inputs)")
    print(" ".join(f"{c:>10}" for c in cols))
    for T in args.seq_lens:
        r = bench_one(T, args, dtype)
        r["fwd x"] = r["fwd ours"] / r["fwd sdpa"]
        r["f+b x"] = r["f+b ours"] / r["f+b sdpa"]
        r["fwd mem x"] = r["fwd mem ours"] / max(r["fwd mem sdpa"], 1e-9)
        r["f+b mem x"] = r["f+b mem ours"] / max(r["f+b mem sdpa"], 1e-9)
        print(" ".join(f"{r[c]:>10d}" if c == "T" else f"{r[c]:>10.3g}" for c in cols), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
