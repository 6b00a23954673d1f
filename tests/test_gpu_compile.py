"""The Triton kernels compiled for GPUs that are not here: what will hold on an A100 (sm_80) and an H100 (sm_90).

The interpreter tests check the kernels' arithmetic; they cannot see shared memory, registers or instructions.
bench/offline_compile.py compiles every kernel through the real wrappers (their tile choices and Triton's own
argument specialization) for both targets, with the ptxas bundled in Triton's wheel, and reports each launch's
resources. Here we assert what the hardware needs: shared memory within the GPU's limit a block (else the first
launch fails), no spilled registers (slow, and local memory the driver reserves outside PyTorch's allocator),
and tensor-core instructions for 16-bit inputs (wgmma on sm_90, mma on sm_80).

It runs in a subprocess: compiling needs TRITON_INTERPRET=0 when fused_kernels/ is imported, and this process
interprets. The variants are the model families' own (bench/offline_compile.py; GPU_COMPILE_ALL=1 compiles the
full grid, ~10 min); results are cached in pytest's cache, keyed by the kernels' sources and Triton's version,
and Triton caches the compiled kernels, so a second run takes seconds.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (no wheels for this platform)")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "offline_compile.py"
KERNELS = ("_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel", "_grad_delta_kernel")


def bundled_tools_missing():
    """Names of the CUDA tools that Triton's NVIDIA backend cannot find (the wheel bundles both)."""
    try:
        from triton import knobs
        paths = {name: getattr(knobs.nvidia, name).path for name in ("ptxas", "cuobjdump")}
    except Exception as e:                                    # no NVIDIA backend in this Triton build
        return [f"NVIDIA backend ({type(e).__name__}: {e})"]
    return [name for name, path in paths.items() if not path or not os.access(path, os.X_OK)]


@pytest.fixture(scope="module")
def rows(request, tmp_path_factory):
    missing = bundled_tools_missing()
    if missing:
        pytest.skip(f"Triton's bundled {', '.join(missing)} not found: cannot compile for a GPU here "
                    "(set TRITON_PTXAS_PATH / TRITON_CUOBJDUMP_PATH to a CUDA toolkit's)")
    full = os.environ.get("GPU_COMPILE_ALL") == "1"
    sources = sorted((ROOT / "fused_kernels").glob("*.py")) + [SCRIPT]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)
                         + f"{triton.__version__} {full}".encode()).hexdigest()[:16]
    cached = request.config.cache.get(f"gpu_compile/{key}", None)
    if cached is not None:
        return cached
    out = tmp_path_factory.mktemp("gpu_compile") / "rows.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, str(SCRIPT), "--json", str(out)] + (["--all"] if full else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800 if full else 480)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    if not any("error" in r for r in result):                 # cache only what can be trusted
        request.config.cache.set(f"gpu_compile/{key}", result)
    return result


def show(bad):
    return "\n".join(f"{r['kernel']} [{r['variant']}] sm_{r['sm']}: {r}" for r in bad)


def test_every_kernel_compiles_for_both_targets(rows):
    errors = [r for r in rows if "error" in r]
    assert not errors, show(errors)
    for sm in (80, 90):
        compiled = {r["kernel"] for r in rows if r["sm"] == sm}
        assert compiled == set(KERNELS), f"sm_{sm}: compiled {sorted(compiled)}, expected {KERNELS}"


def test_shared_memory_fits_the_gpu(rows):
    """Over the limit, the launch fails: 'out of resource: shared memory' (the A100 allows 163 KB a block)."""
    bad = [r for r in rows if r["shared"] > r["shared_limit"]]
    assert not bad, show(bad)


def test_no_register_spills(rows):
    """ptxas's stack frame (spilled registers) and local memory, from cuobjdump: 0 bytes a thread."""
    bad = [r for r in rows if r["stack"] or r["local"]]
    assert not bad, show(bad)


def test_dots_run_on_tensor_cores(rows):
    """16-bit dots become wgmma on sm_90, mma on sm_80. fp32 attention runs on tensor cores too (three TF32
    products; mma, its tiles are too small for wgmma); fp32 grad_delta multiplies in true fp32 (fma)."""
    def wanted(r):
        if r["dtype"] == "float32":
            return {"fma"} if r["kernel"] == "_grad_delta_kernel" else {"mma", "wgmma"}
        return {r["tensor_core_op"]}
    bad = [r for r in rows if r["op"] != "-" and r["op"] not in wanted(r)]
    assert not bad, show(bad)
