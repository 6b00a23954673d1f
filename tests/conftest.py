"""Shared fixtures. The tests import the top-level scripts (`model`, `default_model`, ...), so the repository
root goes on the path, whatever directory pytest is started from."""
import os
import sys
from pathlib import Path

# The one place the tests set TRITON_INTERPRET, before any test module imports kernels/ (kernels/backend.py reads
# it once) or Triton (which reads it when first imported): without a GPU the kernel tests run in Triton's CPU
# interpreter (set TRITON_INTERPRET=0 on a CUDA machine to test the compiled kernels). Tests never reach the
# Hugging Face hub.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def default_ckpt():
    """The default model's checkpoint directory (converted from the GGUF on first use, then cached)."""
    import default_model
    return default_model.default_checkpoint()
