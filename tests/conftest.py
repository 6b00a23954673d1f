"""Shared fixtures. The tests import the top-level scripts (`model`, `default_model`, ...), so the repository
root goes on the path, whatever directory pytest is started from."""
import json
import os
import sys
from pathlib import Path

# The one place the tests set TRITON_INTERPRET, before any test module imports fused_kernels/
# (fused_kernels/backend.py reads it once) or Triton (which reads it when first imported): without a GPU the kernel
# tests run in Triton's CPU interpreter (set TRITON_INTERPRET=0 on a CUDA machine to test the compiled kernels).
# Tests never reach the Hugging Face hub.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: starts several processes with torchrun (gloo on CPU); in the "
                                       "default run too, `-m distributed` runs them alone")


@pytest.fixture(scope="module")
def gguf_parsed_once():
    """`transformers` reads a GGUF file three times to build the reference (its config, its weights, its
    tokenizer), and gguf's reader parses a 262k-token vocabulary element by element each time: about 50 s for
    Gemma 3 270M on a 2-core CPU. This shares one parse per file among them within a test module: the reader is a
    read-only view of the file, so the reference computes what it computed before, from the same bytes."""
    gguf = pytest.importorskip("gguf")
    made, cls = {}, gguf.GGUFReader

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in made:
            made[key] = cls(path, mode)
        return made[key]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        yield made


@pytest.fixture(scope="session")
def default_ckpt():
    """The default model's checkpoint directory (converted from the GGUF on first use, then cached)."""
    from checkpoint_io import default_model
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


@pytest.fixture
def padded_batch():
    """(ids, mask), both (3, 12): random ids of a 101-token vocabulary, rows 1 and 2 right-padded."""
    import torch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 101, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0                          # right padding
    mask[2, 3:] = 0
    return ids, mask


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


# --- stub stage outputs of report.py, for the report's tests (test_report.py, test_sweep.py) ---------------------

PNG = bytes.fromhex("89504e470d0a1a0a")                           # a PNG signature is enough to copy


def _records(phases, fact, impl, epochs=2):
    """Records falling linearly from chance to (fact, impl) in every phase."""
    out = []
    for ph in phases:
        for e in range(epochs + 1):
            a = e / epochs
            out.append({"phase": ph, "epoch": e, "loss": 1.0 - a / 2,
                        "fact_mean_rank": 9.5 + a * (fact - 9.5), "impl_mean_rank": 9.5 + a * (impl - 9.5)})
    return out


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _stub_seed(w, first_impl=1.0, graft_ok=True, second_fact=0.0, landmark_city=1.0, impl_first_forgets=False,
              seed=None):
    """Stage outputs of one seed, as the stages write them, with numbers that reproduce every claim."""
    import torch
    from safetensors.torch import save_file
    args = {"lr": 3e-4, "epochs": 2, "batch_size": 8, "schedule": "warmup_linear", "dtype": "float32", "train_all": False,
            "threads": 2}
    for hop, impl, fact in (("first_hop", first_impl, 0.0), ("second_hop", 2.0, second_fact)):
        _write(w / hop / "metrics.json", {"args": args, "n_params": 1000, "n_trainable": 800, "base_model": "/base",
                                         "torch_threads": 2, "records": _records(["finetune"], fact, impl)})
        L, Ta = 6, 5
        inf = torch.zeros(Ta, L)
        if hop == "first_hop":
            inf[1, 1] = 1.0                                        # early layer, name token
        else:
            inf[-1, 5] = 1.0                                       # late layer, last token
        sc = w / f"scores_{hop}"
        sc.mkdir(parents=True)
        down = torch.zeros(Ta, L)
        down[-1, 5] = 1.0                                          # downstream: late layer, last token
        save_file({"informative.mlp": inf, "informative.attn": torch.zeros(Ta, L, 2), "downstream.mlp": down,
                   "downstream.attn": torch.zeros(Ta, L, 2)}, str(sc / "scores.safetensors"))
        (sc / "scores.png").write_bytes(PNG)
        early_impl, late_impl = (8.0, impl) if hop == "first_hop" else (impl, 7.0)
        _write(w / f"freeze_post_{hop}.json", {
            "early": {"layers": [0, 1, 2, 3], "fact_mean_rank": 3.0, "impl_mean_rank": early_impl},
            "late": {"layers": [4, 5], "fact_mean_rank": 0.5, "impl_mean_rank": late_impl}})
        for which in ("early", "late"):
            bad = (which == "early") == (hop == "first_hop")          # pre-freezing that hop's site: no OCR
            _write(w / f"{hop}_{which}_pre" / "metrics.json",
                  {"args": args, "records": _records(["finetune"], 0.0, impl + 4 if bad else impl)})
    t3 = {"W (base)": {"Impl F'": 9.5, "Impl F": 9.5, "F'": 9.5},
          "W_F'": {"Impl F'": 9.0, "Impl F": 8.5, "F'": 0.0},
          "W_graft": {"Impl F'": 1.0 if graft_ok else 9.0, "Impl F": 3.0, "F'": 0.1},
          "W~_graft": {"Impl F'": 8.4, "Impl F": 0.4, "F'": 0.3}}
    seed = int(w.name.removeprefix("seed")) if seed is None else seed
    g = torch.Generator().manual_seed(seed)                          # per-entry scores (Ta, L), (Ta, L, H)
    f6 = {}
    for c, shape in (("mlp", [5, 6]), ("heads", [5, 6, 2])):
        x = torch.randn(shape, generator=g).flatten()
        f6[c] = {"shape": shape, "downstream": x.tolist(),
                 "informative": (x + 0.5 * torch.randn(x.shape, generator=g)).tolist()}
    _write(w / "graft" / "results.json", {"table3": t3, "fig6": f6, "fig6_authors": f6,
                                         "fig4_facts_first": _records(["pretrain_facts", "pretrain_impls", "finetune"],
                                                                     0.0, 1.0)})
    (w / "graft" / "fig6.png").write_bytes(PNG)
    # impl_first ends continued pretraining on the facts; forgetting the implications shows at its last record
    _write(w / "daxwug_impl_first" / "metrics.json",
          {"records": _records(["pretrain_impls", "pretrain_facts"], 0.0, 6.0 if impl_first_forgets else 0.5)
           + _records(["finetune"], 0.0, 8.0)})
    _write(w / "daxwug_joint" / "metrics.json",
          {"args": args, "records": _records(["pretrain_joint"], 0.0, 0.0) + _records(["finetune"], 0.0, 2.0)})
    _write(w / "preconditions.json", {"city_language": 0.5, "landmark_city": landmark_city,
                                     "in_context_first_hop": 1.0, "in_context_second_hop": 3.0})
    _write(w / "stage_times.json", {"first_hop": {"status": "ok", "seconds": 12.5, "load_at_start": 1.0}})




@pytest.fixture
def stubs():
    """stubs.stub_seed(w, ...) writes one seed's stage outputs that reproduce every claim; stubs.records(phases,
    fact, impl) makes train.py-style records; stubs.write(path, obj) writes JSON, making the parents."""
    from types import SimpleNamespace
    return SimpleNamespace(stub_seed=_stub_seed, records=_records, write=_write, PNG=PNG)
