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


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: starts several processes with torchrun (gloo on CPU); in the "
                                       "default run too, `-m distributed` runs them alone")


@pytest.fixture(scope="session")
def default_ckpt():
    """The default model's checkpoint directory (converted from the GGUF on first use, then cached)."""
    import default_model
    return default_model.default_checkpoint()


def _make_tiny(path, n_layers=4):
    """A tiny random Llama checkpoint (untied head) with a byte-level BPE tokenizer trained on our datasets'
    texts, saved as a checkpoint directory that `checkpoint.from_pretrained` and `load_tokenizer` read."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import data
    texts = [f"{e.prompt} {e.answer}" for name in data.DATASETS for split in data.load_dataset(name).values()
             for e in split]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="session")
def make_tiny():
    """make_tiny(path, n_layers=4) writes a tiny random Llama checkpoint with its own BPE tokenizer."""
    pytest.importorskip("transformers")
    return _make_tiny


@pytest.fixture(scope="session")
def small_json(tmp_path_factory):
    """10 first-hop facts and implications as a user dataset file: 2 steps per epoch at batch 8."""
    import json

    import data
    d = data.load_dataset("first_hop")
    f = tmp_path_factory.mktemp("ds") / "small.json"
    f.write_text(json.dumps({k: [{"prompt": e.prompt, "answer": e.answer} for e in d[k][:10]]
                             for k in ("facts", "implications")}))
    return str(f)
