"""Shared fixtures. The tests import the top-level scripts (`model`, `default_model`, ...), so the repository
root goes on the path, whatever directory pytest is started from."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def default_ckpt():
    """The default model's checkpoint directory (converted from the GGUF on first use, then cached)."""
    import default_model
    return default_model.default_checkpoint()
