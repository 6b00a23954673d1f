"""GGUF (llama.cpp's format) -> an ordinary Hugging Face checkpoint: config.json from the metadata, fp32 weights
under the Hugging Face keys, tokenizer.json from the vocabulary. One set of functions per architecture, named in
default_model.EMBEDDED; checkpoint_io/default_model.py runs them once into the cache."""
import numpy as np
import torch


def field(reader, key):
    f = reader.get_field(key)
    if f is None:
        raise ValueError(f"the GGUF file has no metadata {key!r}: not the file this converter expects")
    return f.contents()


def eps(reader, arch):
    # stored as float32 (9.9999997e-06): 7 significant digits give back the original 1e-05
    return float(f"{field(reader, f'{arch}.attention.layer_norm_rms_epsilon'):.7g}")


def dequantized(t) -> torch.Tensor:
    from gguf.quants import dequantize
    # dequantize returns numpy in row-major (out, in) order: GGUF lists dims innermost first,
    # so ne = [in, out] is already the (out, in) layout of an nn.Linear weight
    # np.array copies: F32 tensors come back as read-only views of the memory-mapped file
    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))


# --- weights: GGUF tensor names -> Hugging Face keys ----------------------------------------------

# llama.cpp's names (gguf-py `tensor_mapping.py`) for the HF keys of one block.
LLAMA_BLOCK_KEYS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",        # Llama: the pre-MLP norm
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3: the same projections; four norms a block (sandwich) and q/k norms
GEMMA3_BLOCK_KEYS = {
    **LLAMA_BLOCK_KEYS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",        # Gemma: ffn_norm is the pre-MLP norm, as in Llama...
    "post_ffw_norm": "post_feedforward_layernorm",  # ...but post_attention_layernorm is after the attention
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
TOP_KEYS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}


def hf_key(name: str, block_keys: dict) -> str:
    if name in TOP_KEYS:
        return TOP_KEYS[name]
    parts = name.split(".")                            # "blk.3.attn_q.weight" -> blk, 3, attn_q, weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in block_keys:
        return f"model.layers.{parts[1]}.{block_keys[parts[2]]}.{parts[3]}"
    # output.weight would mean an untied head; both embedded models tie it to the embeddings
    raise ValueError(f"unexpected GGUF tensor {name!r}: this converter knows only tied heads and these blocks")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q_proj / k_proj (convert_hf_to_gguf.py, LlamaModel.permute).

    HF Llama rotates halves: within a head, dim j pairs with dim j + E/2 (`rotate_half`). llama.cpp's rope
    rotates adjacent pairs (2j, 2j+1), so its converter reorders each head's rows from [first half; second
    half] to interleaved [x0, x(E/2), x1, x(E/2+1), ...]. We read the interleaved order and put the halves
    back. (transformers' GGUF loader does the same: `LlamaTensorProcessor._reverse_permute_weights`.)
    Gemma: not permuted, llama.cpp runs it with rotate-half ("neox") RoPE."""
    out_dim, D = w.shape                               # out_dim = n_heads * E (H for q, K for k)
    E = out_dim // n_heads
    w = w.view(n_heads, E // 2, 2, D)                  # (n_heads, E/2, 2, D): head row 2j+s is pair j, half s
    return w.transpose(1, 2).reshape(out_dim, D)       # (n_heads, 2, E/2, D): rows [half 0; half 1] per head


def llama_weights(reader, cfg: dict) -> dict:
    state = {}
    for t in reader.tensors:
        w = dequantized(t)
        if ".attn_q." in t.name:
            w = unpermute_rope_rows(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute_rope_rows(w, cfg["num_key_value_heads"])   # grouped-query attention: K heads, not H
        state[hf_key(t.name, LLAMA_BLOCK_KEYS)] = w.contiguous()
    return state


def gemma3_weights(reader, cfg: dict) -> dict:
    state = {}
    for t in reader.tensors:
        w = dequantized(t)
        # Gemma's norms compute x * (1 + w) and HF stores w; llama.cpp's converter (Gemma3Model.modify_tensors)
        # stores 1 + w for every "*norm.weight": the block's four, the q/k norms and the final one. Undo it.
        if t.name.endswith("norm.weight"):
            w = w - 1.0
        state[hf_key(t.name, GEMMA3_BLOCK_KEYS)] = w.contiguous()
    return state


def expected_shapes(cfg: dict) -> dict:
    """Every key and its shape, from config.json: the converted weights must match exactly."""
    D, F, V, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    HE, KE = cfg["num_attention_heads"] * E, cfg["num_key_value_heads"] * E
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    block = [("input_layernorm", (D,)), ("post_attention_layernorm", (D,)),
             ("self_attn.q_proj", (HE, D)), ("self_attn.k_proj", (KE, D)),
             ("self_attn.v_proj", (KE, D)), ("self_attn.o_proj", (D, HE)),
             ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)), ("mlp.down_proj", (D, F))]
    if cfg["model_type"] == "gemma3_text":
        block += [("pre_feedforward_layernorm", (D,)), ("post_feedforward_layernorm", (D,)),
                  ("self_attn.q_norm", (E,)), ("self_attn.k_norm", (E,))]
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in block:
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


# --- config.json from the GGUF metadata -----------------------------------------------------------

def llama_config(reader) -> dict:
    if field(reader, "general.architecture") != "llama":
        raise ValueError("the SmolLM2 GGUF is not a llama architecture file")
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
        "rms_norm_eps": eps(reader, "llama"),
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


GEMMA3_SWA_PATTERN = 6           # llama.cpp's Gemma 3 constants (llama-model.cpp, LLM_ARCH_GEMMA3), not in the file:
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # every 6th layer global, the rest sliding; local RoPE base 10,000


def gemma3_config(reader) -> dict:
    if field(reader, "general.architecture") != "gemma3":
        raise ValueError("the Gemma 3 GGUF is not a gemma3 architecture file")
    L, E = field(reader, "gemma3.block_count"), field(reader, "gemma3.attention.key_length")
    if field(reader, "gemma3.attention.value_length") != E:
        raise ValueError("key and value head dims differ: not supported")
    n = GEMMA3_SWA_PATTERN
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": field(reader, "gemma3.embedding_length"),
        "num_hidden_layers": L,
        "num_attention_heads": field(reader, "gemma3.attention.head_count"),
        "num_key_value_heads": field(reader, "gemma3.attention.head_count_kv"),
        "head_dim": E,
        "intermediate_size": field(reader, "gemma3.feed_forward_length"),
        "rms_norm_eps": eps(reader, "gemma3"),
        "hidden_activation": "gelu_pytorch_tanh",
        # Gemma 3: two RoPE bases; written the pre-transformers-5 way, which transformers 5 still reads
        "rope_theta": field(reader, "gemma3.rope.freq_base"),
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
        "rope_scaling": None,
        "sliding_window": field(reader, "gemma3.attention.sliding_window"),
        "sliding_window_pattern": n,
        "layer_types": ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(L)],
        # the softmax scale E**-0.5, as llama.cpp uses for every Gemma 3 but the 27B
        "query_pre_attn_scalar": E,
        "attn_logit_softcapping": None,                # Gemma 3: no soft-caps (Gemma 2 had both)
        "final_logit_softcapping": None,
        "max_position_embeddings": field(reader, "gemma3.context_length"),
        "vocab_size": len(field(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": True,                   # no output.weight in the file (hf_key rejects one)
        "attention_bias": False,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


# --- tokenizer.json from the GGUF vocabulary ------------------------------------------------------

CONTROL, USER_DEFINED = 3, 4                           # llama.cpp token types (<|im_start|>; Gemma's "<h1>", "\n\n")


def smollm_tokenizer(reader):
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


def gemma_tokenizer(reader):
    """Gemma's SentencePiece BPE as a `tokenizers` BPE: spaces written "▁", no prefix space, bytes outside the
    vocabulary as <0xNN> tokens, BOS first."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    if field(reader, "tokenizer.ggml.model") != "llama" or field(reader, "tokenizer.ggml.add_space_prefix"):
        raise ValueError("expected a SentencePiece vocabulary without a prefix space (Gemma's)")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    # Pieces spell a space "▁", except the runs of spaces (ids 138-168), which the file spells with real spaces
    pieces = [t.replace(" ", "▁") if t and set(t) == {" "} else t for t in tokens]
    vocab = {p: i for i, p in enumerate(pieces)}
    assert len(vocab) == len(pieces), "duplicate tokens in the GGUF vocabulary"
    # The file has scores but no merges. SentencePiece BPE merges, at each step, the adjacent pair whose
    # concatenation is the best-scoring piece; the scores here fall strictly with the position, so a merge's
    # rank is its result's position. Every split of a piece into two pieces is a merge to it (longest left first).
    merges = []
    for p, ty in zip(pieces, types):
        if ty in (CONTROL, 6):                         # 6: byte tokens <0xNN>; neither is ever merged into
            continue
        merges += [(p[:j], p[j:]) for j in range(len(p) - 1, 0, -1) if p[:j] in vocab and p[j:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control tokens (<bos>, <start_of_turn>) and user-defined ones ("<h1>", "\n\n") match whole in the text, as
    # in llama.cpp; the runs of spaces among the latter are left to the merges (they are not in `vocab` as spelled)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab])
    # Gemma: BOS before every text (the file says add_bos_token = true; Gemma was trained with it)
    if not field(reader, "tokenizer.ggml.add_bos_token") or field(reader, "tokenizer.ggml.add_eos_token"):
        raise ValueError("this GGUF does not ask for BOS only; the converter assumes Gemma's BOS")
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                       special_tokens=[(tokens[bos], bos)])
    return tok
