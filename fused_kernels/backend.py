"""Which implementation runs, the Triton kernel or its torch twin: the one place that decides.

The rule (`use_triton`): CUDA tensors the kernel supports (their dtype, say), on a machine where Triton imports,
go to the kernel; everything else (CPU tensors, fp64, macOS without Triton wheels) goes to the twin, which is the
definition. Nothing here imports Triton unless a kernel is about to launch, so `import model` and every script
work where Triton is not installed.

Tests that must run the whole model through the kernels on a CPU (in Triton's interpreter) say so explicitly,
for a `with` block: `with backend.forced("triton"): model(ids)`. Nothing else changes the choice.
"""
import contextlib
import functools
import os

import torch

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
