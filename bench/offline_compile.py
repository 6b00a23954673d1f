"""Compile every Triton kernel in fused_kernels/ for NVIDIA GPUs that are not here, and report what the hardware will
see.

Triton compiles for a named target (GPUTarget("cuda", 80, 32): an A100; 90: an H100) without a GPU, down to PTX
and, with the ptxas bundled in its wheel, to a cubin. The interpreter tests check the kernels' arithmetic; this
checks what only the compiled code shows: shared memory a block asks for (over the GPU's limit, the first
launch fails), registers and spilled bytes a thread (ptxas's stack frame, as cuobjdump reports it: spills are
slow, and the driver reserves their local memory outside PyTorch's allocator), and which matrix instruction
the dots became (wgmma on sm_90, mma on sm_80, fma: the CUDA cores).

The kernels are compiled through the real wrappers (fused_kernels.attention.attention_triton, forward and backward,
and fused_kernels.grad_delta.grad_delta_triton) on CPU tensors shaped as the model sends them: each launch is compiled
(Triton's own `warmup` path, with its own argument specialization) instead of run, for a stand-in driver that
names the target. So the tile configurations, dtypes and specializations are the wrappers' own.

    python bench/offline_compile.py                    # the variants training and scoring use, sm_80 and sm_90
    python bench/offline_compile.py --all              # every dtype x head dim x soft-cap x window x GQA
    python bench/offline_compile.py --json out.json    # also the rows as JSON (tests/test_gpu_compile.py)

Needs Triton with its NVIDIA backend (Linux x86-64 wheels); no GPU, no CUDA driver.
"""
import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"     # compile, never interpret: before fused_kernels.backend or Triton are imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root, for fused_kernels/

import torch  # noqa: E402

# Shared memory a block may use, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin; CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability": 163 KB on compute capability 8.0, 227 KB on 9.0).
TARGETS = {80: ("A100", 163 * 1024), 90: ("H100", 227 * 1024)}
# The matrix instruction the 16-bit dots (and the fp32 ones, as three TF32 products) must become.
TENSOR_CORE_OP = {80: "mma", 90: "wgmma"}


# --- the variants: what the model can send --------------------------------------------------------

def attention_variants(full):
    """dicts of attention_triton's inputs. Default: the families' own (dtype, E, soft-cap, window, G)."""
    # fp32 with E = 256 is not among them: fused_kernels.attention.attention sends it to the twin (it spills).
    if full:
        for dtype, E, softcap, window, G in itertools.product(("float32", "bfloat16"), (64, 128, 256),
                                                              (None, 50.0), (None, 64), (1, 4)):
            if not (dtype == "float32" and E == 256):
                yield dict(kind="attention", dtype=dtype, E=E, softcap=softcap, window=window, G=G)
        return
    for dtype in ("float32", "bfloat16"):               # train.py --dtype; scores.py runs fp32
        yield dict(kind="attention", dtype=dtype, E=64, softcap=None, window=None, G=3)     # SmolLM2-135M (default)
        yield dict(kind="attention", dtype=dtype, E=128, softcap=None, window=None, G=4)    # Llama 3 8B, Mistral 7B
    yield dict(kind="attention", dtype="bfloat16", E=256, softcap=50.0, window=64, G=2)     # Gemma 2
    yield dict(kind="attention", dtype="float16", E=128, softcap=None, window=None, G=4)    # direct calls (bench)


def grad_delta_variants(full):
    """dicts of grad_delta_triton's inputs: scores.py sends fp32 activations and weight changes."""
    dtypes = (("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")) if full else \
        (("float32", "float32"), ("bfloat16", "bfloat16"))
    for (act, weight), split in itertools.product(dtypes, ("out", "in")):
        yield dict(kind="grad_delta", dtype=act, dW_dtype=weight, split=split)


def name(v):
    if v["kind"] == "attention":
        return (f"{v['dtype']} E={v['E']} G={v['G']}" + (f" cap={v['softcap']:g}" if v["softcap"] else "")
                + (f" win={v['window']}" if v["window"] else ""))
    return f"{v['dtype']} dW {v['dW_dtype']} split={v['split']}"


def run_wrapper(v):
    """Call the real wrapper on CPU tensors shaped as the model's (transposed views of (B, T, H, E))."""
    dt = getattr(torch, v["dtype"])
    if v["kind"] == "attention":
        from fused_kernels.attention import attention_triton
        B, T, K, E = 2, 100, 2, v["E"]
        H = K * v["G"]
        q, k, v_ = (torch.randn(B, T, n, E, dtype=dt).transpose(1, 2).requires_grad_() for n in (H, K, K))
        mask = torch.ones(B, T, dtype=torch.long)
        o = attention_triton(q, k, v_, scale=E ** -0.5, softcap=v["softcap"], window=v["window"],
                             attention_mask=mask)
        o.backward(torch.randn(B, T, H, E, dtype=dt).transpose(1, 2))
    else:
        from fused_kernels.grad_delta import grad_delta_triton
        N, O, I = 400, 576, 576                               # 20 prompts x 20 positions; SmolLM2's q_proj
        g, x = torch.randn(N, O, dtype=dt), torch.randn(N, I, dtype=dt)
        dW = torch.randn(O, I, dtype=getattr(torch, v["dW_dtype"]))
        grad_delta_triton(g, x, dW, 9, v["split"])


# --- compiling instead of launching ---------------------------------------------------------------

def tool(name):
    """A CUDA binary bundled with Triton (ptxas, cuobjdump), or None."""
    from triton import knobs
    try:
        path = getattr(knobs.nvidia, name).path
    except Exception:                                    # RuntimeError where the binary is missing
        return None
    return path if path and os.access(path, os.X_OK) else None


def resources(compiled):
    """What a compiled kernel needs: {shared, regs, stack, local, op}."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    # "  REG:32 STACK:6976 SHARED:0 LOCAL:0 CONSTANT[0]:488 ...": the Function line's fields
    fields = dict(f.split(":", 1) for f in next(line for line in out.splitlines() if "REG:" in line).split())
    ptx = compiled.asm["ptx"]
    op = ("-" if "tt.dot" not in compiled.asm["ttir"] else        # no dot in the kernel
          "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma")
    md = compiled.metadata
    return dict(shared=md.shared, regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
                op=op, warps=md.num_warps, stages=md.num_stages)


def compile_target(cc, variants):
    """Rows {kernel, variant, sm, resources...} of every launch the wrappers make for `variants`, compiled for
    compute capability cc. Runs in its own process: Triton caches one target per device."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from fused_kernels import backend, triton_attention, triton_grad_delta

    class StandInDriver:                                 # what JITFunction.run asks the driver, and no more
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", cc, 32)

    driver.set_active(StandInDriver())
    backend.capability = lambda x: divmod(cc, 10)        # the wrappers choose tiles for the target...
    backend.on_device = lambda x: contextlib.nullcontext()   # ...and launch on CPU tensors (never run here)
    launched = []
    for module in (triton_attention, triton_grad_delta):
        for kernel in vars(module).values():
            if isinstance(kernel, JITFunction) and kernel.fn.__name__.endswith("_kernel"):
                def compile_only(*args, grid, warmup, _kernel=kernel, **kw):
                    compiled = JITFunction.run(_kernel, *args, grid=grid, warmup=True, **kw)
                    launched.append((_kernel.fn.__name__, compiled))
                    return compiled
                kernel.run = compile_only                # kernel[grid](...) calls self.run
    rows = []
    for v in variants:
        del launched[:]
        try:
            run_wrapper(v)
        except Exception as e:                           # a compile error is a result too
            rows.append(dict(kernel=v["kind"], variant=name(v), sm=cc, error=f"{type(e).__name__}: {e}"[:300]))
            continue
        for kname, compiled in launched:
            # the dtype its dots multiply in: grad_delta's are fp32 unless g, x and dW share a 16-bit dtype
            dot_dtype = v["dtype"] if v.get("dW_dtype", v["dtype"]) == v["dtype"] else "float32"
            rows.append(dict(kernel=kname, variant=name(v), sm=cc, dtype=dot_dtype, triton=triton.__version__,
                             shared_limit=TARGETS[cc][1], tensor_core_op=TENSOR_CORE_OP[cc], **resources(compiled)))
    return rows


# --- checks and the table -------------------------------------------------------------------------

def problems(row):
    """What will fail or be slow on the hardware, as strings; [] for a good row."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    out = []
    if row["shared"] > row["shared_limit"]:
        out.append(f"shared {row['shared']} B > {row['shared_limit']} B")
    if row["stack"] or row["local"]:
        out.append(f"spills {row['stack'] + row['local']} B")
    # 16-bit inputs: the target's own matrix instruction. fp32 attention: tensor cores too (three TF32
    # products; its tiles of 16 rows are too small for wgmma). fp32 grad_delta multiplies in true fp32
    # ("ieee", like torch's matmul): CUDA cores by design.
    wanted = {row["tensor_core_op"]}
    if row["dtype"] == "float32":
        wanted = {"fma"} if row["kernel"] == "_grad_delta_kernel" else {"mma", "wgmma"}
    if row["op"] != "-" and row["op"] not in wanted:
        out.append(f"{row['op']}, not {' or '.join(sorted(wanted))}")
    return out


def table(rows):
    lines = ["| kernel | variant | sm | shared KB | regs | spill B | op | warps/stages | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['sm']} | | | | | | {r['error'][:80]} |")
            continue
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['sm']} | {r['shared'] / 1024:.1f} | {r['regs']} | "
                     f"{r['stack'] + r['local']} | {r['op']} | {r['warps']}/{r['stages']} | "
                     f"{'; '.join(problems(r)) or 'ok'} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="the full variant grid, not only the families' own")
    p.add_argument("--targets", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS),
                   help="compute capabilities to compile for")
    p.add_argument("--kind", choices=["attention", "grad_delta"], help="only this kernel file's kernels")
    p.add_argument("--jobs", type=int, default=2, help="processes compiling in parallel (one target each)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench/offline_compile.py: Triton is not installed (no wheels for this platform)")
    missing = [t for t in ("ptxas", "cuobjdump") if tool(t) is None]
    if missing:
        sys.exit(f"bench/offline_compile.py: Triton's NVIDIA tools {missing} are missing (set TRITON_PTXAS_PATH "
                 "and TRITON_CUOBJDUMP_PATH, or install a Triton wheel that bundles them)")
    variants = [v for v in list(attention_variants(args.all)) + list(grad_delta_variants(args.all))
                if args.kind in (None, v["kind"])]
    # spawn, not fork: each worker imports Triton afresh and holds one target
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = [r for part in pool.map(compile_target, args.targets, [variants] * len(args.targets)) for r in part]
    print(table(rows))
    bad = [r for r in rows if problems(r)]
    print(f"\n{len(rows)} compiled kernels, {len(bad)} with problems (Triton {rows[0].get('triton', '?')})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
