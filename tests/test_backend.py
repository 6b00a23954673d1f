"""Tests for fused_kernels/backend.py: which implementation runs, and that the project works without Triton.

The dispatch rule is tested on meta tensors and stand-ins for CUDA tensors (no GPU here); the absence of Triton
in a subprocess whose imports of `triton` fail, as on macOS.
"""
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fused_kernels.attention as A
import fused_kernels.grad_delta as GD
from fused_kernels import backend

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, block_triton=False):
    """Run code in a fresh interpreter at the repository root, TRITON_INTERPRET unset; `block_triton`: every
    import of triton raises ImportError (a machine without Triton wheels)."""
    prelude = textwrap.dedent("""
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("No module named 'triton' (blocked by the test)")
        sys.meta_path.insert(0, NoTriton())
    """) if block_triton else ""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_importing_the_project_does_not_import_triton():
    out = run_python("""
        import sys
        import model, data, train, scores, graft, report
        import checkpoint_io.default_model, fused_kernels.attention, fused_kernels.grad_delta
        print("triton" in sys.modules)
    """)
    assert out.strip() == "False"


def test_without_triton_everything_runs_the_twin():
    """macOS: no Triton wheel. The model, attention and grad_delta still run (the twins); asking for the kernel
    says what to do."""
    out = run_python("""
        import torch
        import model
        from fused_kernels import backend
        from fused_kernels.attention import attention, attention_triton
        from fused_kernels.grad_delta import grad_delta
        assert not backend.triton_available()
        q = torch.randn(1, 2, 5, 16)
        o = attention(q, q, q, scale=0.25)
        s = grad_delta(torch.randn(4, 6), torch.randn(4, 3), torch.randn(6, 3), 2, "out")
        try:
            attention_triton(q, q, q, scale=0.25)
        except RuntimeError as e:
            print(o.shape == q.shape, tuple(s.shape), "not installed" in str(e))
    """, block_triton=True)
    assert out.split() == ["True", "(4,", "2)", "True"]


def test_attention_sends_the_kernel_only_what_it_takes():
    meta = lambda dtype, E: torch.empty(1, 2, 3, E, dtype=dtype, device="meta")     # (B, H, T, E), no data
    assert A.kernel_takes(meta(torch.bfloat16, 256)) and A.kernel_takes(meta(torch.float32, 128))
    assert not A.kernel_takes(meta(torch.float64, 64))            # fp64 does not compile
    assert not A.kernel_takes(meta(torch.float32, 256))           # spills: bench/README.md
    assert not A.kernel_takes(meta(torch.bfloat16, 512))          # no tiles for it


def test_the_rule_cuda_tensors_the_kernel_takes():
    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert backend.use_triton(cuda, True) == backend.triton_available()
    assert not backend.use_triton(cuda, False) and not backend.use_triton(cpu, True)


def test_forced_overrides_the_rule_for_its_block_only():
    cpu = SimpleNamespace(is_cuda=False)
    with backend.forced("triton"):
        assert backend.use_triton(cpu, False)
        with backend.forced("torch"):
            assert not backend.use_triton(cpu, True)
        assert backend.use_triton(cpu, False)
    assert not backend.use_triton(cpu, True)
    with pytest.raises(ValueError, match="forced"):
        with backend.forced("cuda"):
            pass


def test_kernels_launch_on_the_tensors_device_or_refuse(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setattr(backend, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        backend.on_device(x)
    monkeypatch.setattr(backend, "INTERPRET", True)
    with backend.on_device(x):                                    # the interpreter: nothing to switch
        pass
    assert backend.capability(x) is None


@pytest.mark.skipif(not backend.triton_available(), reason="Triton is not installed")
def test_the_kernels_refuse_fp64_with_a_clear_error():
    q = torch.zeros(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="call attention"):
        A.attention_triton(q, q, q, scale=1.0)
    g = torch.zeros(4, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="call grad_delta"):
        GD.grad_delta_triton(g, torch.zeros(4, 3), torch.zeros(6, 3), 2, "out")
    # the dispatching functions send fp64 to the twins, whatever the device
    assert A.attention(q, q, q, scale=1.0).dtype == torch.float64
