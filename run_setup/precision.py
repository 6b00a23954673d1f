"""The one dtype policy: which precision the matmuls run in, why, and the bf16 weight copies they read.

Master weights, Adam's moments, norms, RoPE, the attention scores and softmax, logits and loss are fp32 whatever
the policy (STYLE rule 6). What `bfloat16` changes is the training steps' matmuls of the projections (q, k, v, o,
gate, up, down), the attention's probabilities times V and the frozen head's training matmul: they read bf16 copies
of the weights and bf16 activations, and accumulate in fp32 inside the CPU's (or GPU's) bf16 instructions (on a
CPU without them, fp32 kernels multiply the same bf16 values: fused_kernels/backend.py's linear and matmul). The
ranks are evaluated in fp32 all the same (fp32(): evaluations in bf16 gave other ranks than fp32 on 1-11 prompts of
most of the report's splits, BF16_CHECKS_HOLD), so a bf16 run's ranks differ from an fp32 run's only by what its
training did; the scores (scores.py, exact.py) are fp32 always.

Why copies and not autocast: autocast casts every fp32 weight at every matmul that reads it (frozen ones at every
use, trained ones once per forward), 64,681 casts and 2.4 s of a 14 s default finetune on an AMX Xeon
(../shared/profile-default-finetune.md). Here each weight is cast once when a phase starts and refreshed in place
right after Adam updates it (AdamInBackward's after_step, while the weight is still in cache): once per
optimizer step. model.Linear's backward writes the weight's gradient (the bf16 values' product, accumulated and kept
in fp32: autocast's is rounded to bf16) into the fp32 master's gradient, which Adam reads.

The default (default_dtype): bf16 on a Linux CPU with bf16 matrix instructions (AMX or AVX512-BF16) only if the
bf16 checks hold (BF16_CHECKS_HOLD); they did not, so the default is fp32 everywhere for now; `--dtype bfloat16`
opts in. Every run records the choice and the CPU's ISA (describe()) in its settings.
"""
import contextlib
import platform

import torch

import model as M
from fused_kernels.backend import cpu_isa, cpuinfo   # cpu_isa: this module's name too (report.py)

DTYPES = ("float32", "bfloat16")


# --- the CPU: its name (its bf16 matrix instructions: fused_kernels/backend.py's cpu_isa) ------------------

def cpu_name():
    """The processor's model name (Linux: /proc/cpuinfo; elsewhere platform.processor()): the last digits of a
    training run depend on it, on its ISA and on the thread count, so runs and the report name them."""
    return cpuinfo("model name") or platform.processor() or "unknown CPU"


# Whether bf16 passed the checks that would make it a default (measured 2026-12-05, AMX Xeon, default cell): it did
# not. Per-prompt ranks evaluated in bf16 differ from fp32 on 1-11 prompts of most splits of the report's datasets
# (base model: first hop facts 10.70 -> 10.85), and eq. 6's upstream scores in bf16 correlate r 0.998 (heads) with
# fp32's, under the 0.999 asked. So evaluations and scores stay fp32 (fp32()). bf16 training moved no verdict: the
# 3-seed report without the graft sweep, every finetune in bf16 (on an AMD EPYC, fp32 kernels on bf16 values:
# backend.linear), gave fp32's verdicts on all nine claims, though some numbers moved (the authors' Fig. 6 MLP r
# +0.26 -> +0.01, inconclusive both ways; bench/README.md). It stays opt-in all the same: on the AMX Xeon our bf16
# finetune was no faster than fp32 (whole default job, idle: 30.8 s against 29.0 s; the step, 48 tokens, is bound by
# memory traffic: Adam's and the copies', bench/README.md), so it would change the numbers for no gain.
BF16_CHECKS_HOLD = False


def default_dtype(device, system=None, isa=None, checks_hold=None):
    """--dtype's default on `device`: bfloat16 on a Linux CPU with bf16 matrix instructions if the bf16 checks hold
    (BF16_CHECKS_HOLD), float32 otherwise."""
    system = platform.system() if system is None else system
    isa = cpu_isa() if isa is None else isa
    checks_hold = BF16_CHECKS_HOLD if checks_hold is None else checks_hold
    if checks_hold and torch.device(device).type == "cpu" and system == "Linux" and isa != "neither":
        return "bfloat16"
    return "float32"


def slow_bf16(device, dtype, isa=None):
    """A one-line note when bf16 matmuls were asked for on a CPU without bf16 matrix instructions: there they run as
    fp32 kernels on bf16 values (backend.bf16_on_fp32_kernels; torch's own bf16 kernels ran the finetune 8x slower
    than fp32 on a 2-core AMD EPYC with AVX2 only), which gives bf16's numbers but no speed; None otherwise."""
    isa = cpu_isa() if isa is None else isa
    if dtype == "bfloat16" and torch.device(device).type == "cpu" and isa == "neither":
        return (f"--dtype bfloat16 on {cpu_name()}: this CPU has no bf16 matrix instructions (AMX or AVX512-BF16), "
                f"so bf16 matmuls run as fp32 kernels on bf16 values, slower than fp32 (the casts); --dtype float32 "
                f"is the fast choice")
    return None


def describe(device, dtype):
    """What every run's settings record about its precision: the dtype, how it was chosen, the CPU and its ISA."""
    return {"dtype": dtype, "default_dtype": default_dtype(device), "device": str(device), "cpu": cpu_name(),
            "cpu_isa": cpu_isa(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


# --- the bf16 weight copies ---------------------------------------------------------------------------------

class Copies:
    """bf16 copies of every model.Linear's weight (and bias), installed as the module's `lowp`, and of a frozen
    output head (`head`: the tied embedding has no Linear). refresh(p) re-casts the copy of parameter p in place."""

    def __init__(self, model):
        self.of = {}                                              # parameter -> its bf16 copy
        self.modules = [m for m in model.modules() if isinstance(m, M.Linear)]
        for m in self.modules:
            m.lowp = self._copy(m.weight)
            m.lowp_bias = None if m.bias is None else self._copy(m.bias)
        w = model.head_weight()
        self.head = None if w.requires_grad else self.of.get(w, None)
        if self.head is None and not w.requires_grad:
            self.head = self._copy(w)

    def _copy(self, p):
        self.of[p] = p.detach().to(torch.bfloat16)
        return self.of[p]

    @torch.no_grad()
    def refresh(self, p):
        """After p's optimizer step: its copy (if any) equal to p rounded to bf16 again."""
        c = self.of.get(p)
        if c is not None:
            c.copy_(p)

    def remove(self):
        for m in self.modules:
            m.lowp = m.lowp_bias = None


@contextlib.contextmanager
def fp32(model):
    """Within the block, `model`'s matmuls run in fp32 from its master weights, bf16 copies installed or not (they
    are set aside and put back), and autocast is off: train.evaluate's ranks."""
    saved = [(m, m.lowp, m.lowp_bias) for m in model.modules() if isinstance(m, M.Linear)]
    for m, _, _ in saved:
        m.lowp = m.lowp_bias = None
    try:
        with torch.autocast(next(model.parameters()).device.type, enabled=False):
            yield
    finally:
        for m, w, b in saved:
            m.lowp, m.lowp_bias = w, b


def sharded(model):
    """FSDP2 (run_setup/dist.py) shards parameters into DTensors: copies of shards cannot feed the gathered matmul."""
    return any(hasattr(p, "to_local") for p in model.parameters())


@contextlib.contextmanager
def matmuls(model, dtype):
    """Within the block, model's matmuls run in `dtype` ("float32" or "bfloat16"). Yields the Copies whose
    refresh() the optimizer calls after each parameter's step, or None (fp32, or copies already installed by an
    enclosing block). Under FSDP2: None, and bf16 runs through autocast() instead."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    installed = any(getattr(m, "lowp", None) is not None for m in model.modules() if isinstance(m, M.Linear))
    if dtype == "float32" or installed or sharded(model):
        yield None
        return
    copies = Copies(model)
    try:
        yield copies
    finally:
        copies.remove()


def autocast(model, dtype):
    """bf16 matmuls of a model sharded by FSDP2 (no copies there), under autocast around each forward; off
    otherwise."""
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16,
                          enabled=dtype == "bfloat16" and sharded(model))


def bf16_head(model, dtype):
    """A bf16 copy of the output head for the training loss when matmuls run in bf16 (`dtype`, --dtype) and the
    head is frozen (the default), else None. Made once: autocast would cast the frozen (V, D) matrix anew at every step,
    and the head's two fp32 matmuls per step (logits, and their gradient) read 113 MB each for the default
    model (0.03 s of a 0.38 s CPU step, 0.01 s in bf16)."""
    w = model.head_weight()
    if dtype != "bfloat16" or w.requires_grad:
        return None
    return w.detach().to(torch.bfloat16)
