"""Speedups that change no number, only time: kept out of train.py so that its loop reads as the method.

Each was measured with bench/train_speed.py on a 2-core CPU (bench/README.md has the runs):
  - keep_freed_memory: glibc keeps the memory a step frees instead of faulting it back in, zeroed, at the next
    step (3000-4500 page faults a bf16 step before, under 100 after; 5-10% of a step);
  - fused_adam: PyTorch's fused Adam kernel for one parameter, sharing one step count (6 ms less bookkeeping a
    step than the functional optimizer over the default model's 270 tensors); the same update as the formula.
"""
import ctypes

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                       # mallopt's parameters, from glibc's malloc.h


def for_device(device):
    """The one call train.py makes: every speedup that applies to `device`."""
    if torch.device(device).type == "cpu":
        keep_freed_memory()


def keep_freed_memory():
    """Ask glibc's malloc to serve blocks up to 32 MB (its largest mmap threshold) from its heap and to trim the
    heap only above 1 GB, so that what a step frees is reused by the next. Linux (glibc) only; elsewhere a no-op."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt                # glibc only
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


def has_fused_adam(params):
    """PyTorch's fused Adam kernel exists for CPU and CUDA tensors."""
    return all(p.device.type in ("cpu", "cuda") for p in params)


def fused_adam(p, g, m, v, t, lr, betas, eps):
    """One Adam step of parameter p (gradient g, moments m and v, step count tensor t) in one kernel: the kernel
    torch.optim.Adam(fused=True) calls, here without the optimizer's per-parameter bookkeeping."""
    torch._fused_adam_([p], [g], [m], [v], [], [t], lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=0.0,
                       eps=eps, amsgrad=False, maximize=False)
