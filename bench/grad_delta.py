"""Benchmark fused_kernels/grad_delta.py on a GPU: the Triton kernel against the torch twin, time and peak memory.

Shapes are a 7B model's (Llama 2/Mistral-like, D = 4096, F = 14336) with N = 20 prompts x 20 positions:
q_proj (32 heads, split="out"), o_proj (32 heads, split="in"), gate_proj (the MLP, one group).

    python bench/grad_delta.py [--dtype bfloat16] [--n 400]
"""
import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):                                     # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fused_kernels.grad_delta import grad_delta_torch, grad_delta_triton   # noqa: E402

# (name, O, I, n_groups, split)
SHAPES = [
    ("q_proj   32 heads", 4096, 4096, 32, "out"),
    ("o_proj   32 heads", 4096, 4096, 32, "in"),
    ("gate_proj  1 group", 14336, 4096, 1, "out"),
]


def peak_extra_mib(fn):
    # Memory allocated by one call beyond the inputs already resident, in MiB.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="positions N (prompts x tokens), default 400")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of g, x and dW (the score is fp32 either way), default bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/grad_delta.py: no CUDA device, nothing to benchmark (run it on a GPU machine).")
        return
    import triton.testing                                         # after the CUDA check: only needed here

    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, N={args.n}, {args.dtype}; ratios are twin / triton")
    print(f"{'map':20s} {'twin ms':>8s} {'triton ms':>9s} {'speedup':>7s} "
          f"{'twin MiB':>9s} {'triton MiB':>10s} {'mem ratio':>9s} {'rel err':>8s}")
    for name, O, I, n_groups, split in SHAPES:
        g = torch.randn(args.n, O, device="cuda", dtype=dtype)                 # (N, O)
        x = torch.randn(args.n, I, device="cuda", dtype=dtype)                 # (N, I)
        dW = (0.01 * torch.randn(O, I, device="cuda")).to(dtype)               # (O, I)
        runs = {impl: (lambda fn=fn, g=g, x=x, dW=dW: fn(g, x, dW, n_groups, split))
                for impl, fn in (("torch", grad_delta_torch), ("triton", grad_delta_triton))}
        want, got = runs["torch"](), runs["triton"]()                         # also compiles the kernel
        err = ((got - want).abs().max() / want.abs().max()).item()
        ms = {k: triton.testing.do_bench(fn, return_mode="median") for k, fn in runs.items()}
        mib = {k: peak_extra_mib(fn) for k, fn in runs.items()}
        print(f"{name:20s} {ms['torch']:8.3f} {ms['triton']:9.3f} {ms['torch'] / ms['triton']:7.2f} "
              f"{mib['torch']:9.1f} {mib['triton']:10.2f} {mib['torch'] / max(mib['triton'], 1e-6):9.1f} "
              f"{err:8.1e}")
        del g, x, dW, runs, want, got


if __name__ == "__main__":
    main()
