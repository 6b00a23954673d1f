"""The architecture of a checkpoint: a frozen dataclass built from its `config.json`, each field mapped
explicitly for the Llama, Mistral, OLMo, OLMo 2, Gemma 2, Gemma 3 and Qwen 2 families (the keys and defaults
of `transformers`' configs for them); an unsupported variant is an error that names it. model.py builds the
transformer from it.
"""
from dataclasses import dataclass


# Gemma 3: the defaults of transformers' Gemma3TextConfig, for the fields a checkpoint's config.json may omit
# (google/gemma-3-4b-pt's text_config lists only what differs from them, e.g. no head counts)
GEMMA3_DEFAULTS = dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                       sliding_window=4096, sliding_window_pattern=6, rope_theta=1_000_000.0,
                       rope_local_base_freq=10_000.0, tie_word_embeddings=True)

# config.json's fields by the kind of value they must hold, checked before any is used: a damaged or hand-edited
# file ("hidden_size": "64", zero heads) is then one line naming the field, not a TypeError deep inside the model
SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "intermediate_size", "max_position_embeddings", "sliding_window", "sliding_window_pattern")   # ints >= 1
SCALES = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar", "attn_logit_softcapping",
          "final_logit_softcapping", "clip_qkv", "factor", "low_freq_factor", "high_freq_factor",
          "original_max_position_embeddings", "partial_rotary_factor")                   # finite numbers > 0
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "use_bidirectional_attention")
OBJECTS = ("text_config", "rope_scaling", "rope_parameters")


def check_fields(cfg, where="config.json"):
    """Each field present (and not null) holds its kind of value; the RoPE settings' objects are checked alike."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must be a JSON object of settings, not a {type(cfg).__name__}")
    fix = "fix or re-download it"
    for k, v in cfg.items():
        if v is None:
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if k in SIZES and not (type(v) is int and v >= 1):
            raise ValueError(f"{where}: {k} must be a whole number of at least 1, not {v!r:.60}: {fix}")
        if k in SCALES and not (number and 0 < v < float("inf")):
            raise ValueError(f"{where}: {k} must be a number above 0, not {v!r:.60}: {fix}")
        if k in FLAGS and not isinstance(v, bool):
            raise ValueError(f"{where}: {k} must be true or false, not {v!r:.60}: {fix}")
        if k in OBJECTS or isinstance(v, dict) and where.endswith("rope_parameters"):   # Gemma 3: one per layer type
            if not isinstance(v, dict):
                raise ValueError(f"{where}: {k} must be an object {{...}}, not {v!r:.60}: {fix}")
            check_fields(v, f"{where}: {k}")
    H, K = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if isinstance(H, int) and isinstance(K, int) and H % K:
        raise ValueError(f"{where}: num_attention_heads ({H}) is no multiple of num_key_value_heads ({K}): "
                         f"{fix}")


@dataclass(frozen=True)
class Config:
    model_type: str
    vocab_size: int
    dim: int                       # D, hidden_size
    n_layers: int                  # L
    n_heads: int                   # H
    n_kv_heads: int                # K (grouped-query attention when K < H)
    head_dim: int                  # E
    ffn_dim: int                   # F, intermediate_size
    norm_eps: float
    rope_theta: float              # RoPE base (Gemma 3: of the full-attention layers)
    rope_llama3: tuple | None      # (factor, low_freq_factor, high_freq_factor, original_max_positions)
    rope_linear: float | None      # Gemma 3 4B+: positions divided by this factor (full-attention layers only)
    rope_local_theta: float | None # Gemma 3: RoPE base of the sliding-window layers (None: one table for all)
    tie_embeddings: bool
    activation: str                # "silu" or "gelu_tanh"
    norm: str                      # "rms", "rms_plus_one" (Gemma), "layernorm_noparam" (OLMo)
    qkv_bias: bool                 # Qwen 2: biases on q, k, v
    o_bias: bool
    mlp_bias: bool
    clip_qkv: float | None         # OLMo: clamp q, k, v
    qk_norm: str | None            # RMSNorm on q and k: "all_heads" (OLMo 2, over H*E) or "per_head" (Gemma 3, over E)
    post_norms: bool               # OLMo 2: norms after attention and MLP instead of before
    sandwich_norms: bool           # Gemma 2, 3: norms before and after attention and MLP
    embed_scale: bool              # Gemma 2, 3: embeddings times sqrt(D)
    attn_scale: float              # softmax temperature: E**-0.5, Gemma: query_pre_attn_scalar**-0.5
    attn_softcap: float | None     # Gemma 2
    final_softcap: float | None    # Gemma 2
    sliding_window: int | None
    sliding_layers: tuple          # indices of layers that use the sliding window
    max_positions: int | None      # max_position_embeddings: the longest sequence the model was trained on

    @staticmethod
    def from_json(cfg: dict) -> "Config":
        check_fields(cfg)
        mt = cfg.get("model_type")
        if mt == "gemma3":    # Gemma 3 4B+: the text model is one part; the top-level flag ties its head (transformers)
            cfg = {**cfg.get("text_config", {}), "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
            mt = cfg["model_type"] = "gemma3_text"
        supported = ("llama", "mistral", "olmo", "olmo2", "gemma2", "gemma3_text", "qwen2")
        if mt not in supported:
            raise ValueError(f"unsupported model_type {mt!r}: supported are {', '.join(supported)}, gemma3")
        gemma2, gemma3 = mt == "gemma2", mt == "gemma3_text"
        gemma = gemma2 or gemma3
        if gemma3:
            cfg = {**GEMMA3_DEFAULTS, **cfg}
            if cfg.get("use_bidirectional_attention"):
                raise ValueError("unsupported config: gemma3 with use_bidirectional_attention=true")
        H = cfg["num_attention_heads"]
        E = cfg.get("head_dim") or cfg["hidden_size"] // H
        L = cfg["num_hidden_layers"]
        theta, llama3, linear, local_theta = Config.rope_settings(cfg, gemma3)
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("unsupported config: partial_rotary_factor != 1")
        if mt == "qwen2" and cfg.get("use_sliding_window"):
            raise ValueError("unsupported config: qwen2 with use_sliding_window=true")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {act!r} (supported: silu, gelu_pytorch_tanh)")
        window = cfg.get("sliding_window") if gemma or mt == "mistral" else None
        if gemma3 and not cfg.get("layer_types"):
            # older Gemma 3 configs: every `sliding_window_pattern`-th layer is global, the rest slide
            n = cfg["sliding_window_pattern"]
            cfg["layer_types"] = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(L)]
        if gemma:
            # transformers >= 5 lists layer_types; older Gemma 2 configs mean "even layers slide"
            types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                               for i in range(L)]
            sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        else:                                                     # Mistral: every layer, when it has a window
            sliding = tuple(range(L)) if window is not None else ()
        return Config(
            model_type=mt, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=L, n_heads=H,
            n_kv_heads=cfg.get("num_key_value_heads") or H, head_dim=E, ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_llama3=llama3,
            rope_linear=linear, rope_local_theta=local_theta,
            tie_embeddings=cfg.get("tie_word_embeddings", gemma),
            activation="silu" if act == "silu" else "gelu_tanh",
            norm="rms_plus_one" if gemma else "layernorm_noparam" if mt == "olmo" else "rms",
            qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)),   # Qwen 2: q/k/v biases
            o_bias=mt != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            clip_qkv=cfg.get("clip_qkv") if mt == "olmo" else None,
            qk_norm={"olmo2": "all_heads", "gemma3_text": "per_head"}.get(mt),
            post_norms=mt == "olmo2", sandwich_norms=gemma, embed_scale=gemma,
            attn_scale=(cfg["query_pre_attn_scalar"] if gemma else E) ** -0.5,
            attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
            final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
            sliding_window=window, sliding_layers=sliding,
            max_positions=cfg.get("max_position_embeddings"),
        )

    @staticmethod
    def rope_settings(cfg: dict, gemma3: bool):
        """(theta, llama3, linear, local_theta) from either spelling of the RoPE settings."""
        # transformers >= 5 writes `rope_parameters` (Gemma 3: one dict per layer type);
        # older configs write rope_theta + rope_scaling (Gemma 3: + rope_local_base_freq for the local layers)
        rope = dict(cfg.get("rope_parameters") or {})
        local_theta = None
        if gemma3:
            if "sliding_attention" in rope:
                local = rope["sliding_attention"]
                if local.get("rope_type", "default") != "default":
                    raise ValueError(f"unsupported rope_parameters.sliding_attention.rope_type "
                                     f"{local['rope_type']!r} (supported: default)")
                local_theta = float(local.get("rope_theta", cfg["rope_local_base_freq"]))
            else:
                local_theta = float(cfg["rope_local_base_freq"])
            rope = dict(rope.get("full_attention") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        llama3 = linear = None
        if rope_type == "llama3" and not gemma3:
            llama3 = (scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                      scaling["original_max_position_embeddings"])
        elif rope_type == "linear" and gemma3:                    # Gemma 3 4B+: on the global layers only
            linear = float(scaling["factor"])
        elif rope_type != "default":
            supported = "default, linear" if gemma3 else "default, llama3"
            raise ValueError(f"unsupported rope scaling type {rope_type!r} (rope_scaling / rope_parameters; "
                             f"supported for this model_type: {supported})")
        return theta, llama3, linear, local_theta
