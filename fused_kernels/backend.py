"""Which implementation runs, the Triton kernel or its torch twin: the one place that decides.

The rule (`use_triton`): CUDA tensors the kernel supports (their dtype, say), on a machine where Triton imports,
go to the kernel; everything else (CPU tensors, fp64, macOS without Triton wheels) goes to the twin, which is the
definition. Nothing here imports Triton unless a kernel is about to launch, so `import model` and every script
work where Triton is not installed.

Tests that must run the whole model through the kernels on a CPU (in Triton's interpreter) say so explicitly,
for a `with` block: `with backend.forced("triton"): model(ids)`. Nothing else changes the choice.

The same holds for bf16 matmuls (`linear`, `matmul`): torch's bf16 kernels where the hardware has bf16 matrix
instructions (a GPU; a CPU with AMX or AVX512-BF16); on a CPU without them torch falls back to kernels that ran
about 50x slower than fp32 on a 2-core AMD EPYC (1-2 GFLOP/s against 74-92: bench/README.md), so there the same
bf16 values go through the fp32 kernel and the product is rounded to bf16. Both multiply bf16 numbers exactly,
accumulate in fp32 and round the result to bf16: the numbers are a bf16 matmul's up to the order of the sums.
"""
import contextlib
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

# Triton reads the same variable when it is first imported and when each @triton.jit decorator runs (then it
# interprets the kernels on the CPU instead of compiling them). This is our only read of it: tests set it in
# tests/conftest.py before anything imports Triton.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_forced = None     # None: the rule decides; "triton" or "torch": set by forced() for its `with` block


@functools.cache
def triton_available():
    """Whether Triton imports here (no wheels for macOS or Windows). Imports it, once, the first time it is asked."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x, kernel_takes):
    """True if the inputs, of which x is the first, go to the Triton kernel; False: to the torch twin.
    kernel_takes: whether the kernel supports them (dtypes, head dim), which the kernel's file knows."""
    if _forced is not None:
        return _forced == "triton"
    return x.is_cuda and kernel_takes and triton_available()


@contextlib.contextmanager
def forced(impl):
    """Within the block, every dispatch goes to `impl` ("triton" or "torch") whatever the tensors. For tests:
    "triton" on CPU tensors needs TRITON_INTERPRET=1 (tests/conftest.py sets it)."""
    global _forced
    if impl not in ("triton", "torch"):
        raise ValueError(f'forced() takes "triton" or "torch", got {impl!r}')
    before, _forced = _forced, impl
    try:
        yield
    finally:
        _forced = before


def check_kernel_inputs(name, dtypes, *tensors):
    """Clear errors before a kernel launch, instead of an ImportError or a compile failure deep inside Triton."""
    if not triton_available():
        raise RuntimeError(f"the Triton {name} kernel needs Triton, which is not installed (it has wheels for "
                           f"Linux x86-64 only): call {name}() instead, which runs the torch twin")
    for t in tensors:
        if t.dtype not in dtypes:
            raise TypeError(f"the Triton {name} kernel takes {', '.join(str(d) for d in dtypes)}, got {t.dtype}: "
                            f"call {name}() instead, which sends other dtypes to the torch twin")


def on_device(x):
    """The context to launch kernels on x: its own CUDA device (Triton launches on the *current* device, which for
    `--device cuda:1` is not x's), or nothing under the interpreter. Anything else is an error."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    if INTERPRET:
        return contextlib.nullcontext()
    raise RuntimeError(f"the Triton kernels need CUDA tensors (got {x.device}), or Triton's CPU interpreter: set "
                       "TRITON_INTERPRET=1 before starting Python, or call the dispatching function (attention, "
                       "grad_delta), which sends CPU tensors to the torch twin")


def capability(x):
    """x's GPU generation, e.g. (8, 0) for an A100, (9, 0) for an H100: the tile configurations depend on it
    (shared memory per block, tensor-core instructions). None under the interpreter."""
    return torch.cuda.get_device_capability(x.device) if x.is_cuda else None


# --- bf16 matmuls: the CPU's bf16 matrix instructions, or fp32 kernels on bf16 values ---------------------

@functools.cache
def cpuinfo(field):
    """The value of `field` ("flags", "model name") on the first CPU's line of /proc/cpuinfo (Linux), or None where
    it cannot be read (macOS, say); read once a field."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_flags():
    """The CPU's feature flags, an empty set where they cannot be read; a set made once (every bf16 matmul asks)."""
    return frozenset((cpuinfo("flags") or "").split())


def cpu_isa(flags=None):
    """The CPU's bf16 matrix instructions: "AMX" (amx_bf16: tile matmuls, ~7x fp32 at our shapes), "AVX512-BF16"
    (avx512_bf16: bf16 dot products, ~2-3x fp32), or "neither" (torch's bf16 matmuls are slow fallbacks there)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "neither"


def bf16_on_fp32_kernels(x):
    """Whether a bf16 matmul reading x runs as an fp32 matmul of the same values (module docstring): x is bf16 on a
    CPU without bf16 matrix instructions."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and cpu_isa() == "neither"


def linear(x, w, b=None):
    """F.linear(x, w, b) for x, w (and b) of one low-precision dtype, the result in that dtype: y = x w^T + b."""
    if bf16_on_fp32_kernels(x):                                # fp32 product of bf16 values, rounded once
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)


def matmul(a, b):
    """a @ b, as linear() for two tensors of one dtype."""
    if bf16_on_fp32_kernels(a):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b
