"""One minimal decoder-only transformer for the Llama, Mistral, OLMo, OLMo 2, Gemma 2, Gemma 3 and Qwen 2
checkpoint families.

Built from a checkpoint's architecture (config.py's Config, from its `config.json`); checkpoint_io/checkpoint.py loads
the weights straight from its `*.safetensors`, never through `transformers`. Module names mirror the Hugging Face
keys, so loading is `load_state_dict(strict=True)` and our saved checkpoints load in other tools.

Shape letters: B batch, T positions, D width, H query heads, K key/value heads, E head dim,
F MLP width, V vocabulary, L layers.

Components for the scores (paper Sec. 4) are read and replaced through `Taps`: a dict-like record of
named activations (`layers.{i}.{place}`), see the "taps" section below.
"""
import math
from collections import UserDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import Config
from fused_kernels import backend
from fused_kernels.attention import attention


# --- taps: reading and replacing named activations ------------------------------------------------

class Taps(UserDict):
    """Activations by name, `layers.{i}.{place}`, filled during a forward pass. A mapping, not a dict subclass:
    FSDP2 (run_setup/dist.py) rebuilds the dicts among a sharded block's arguments, which would record into a copy.

    Places (TransformerLens names): resid_pre, attn_in (normed input of q/k/v), q, k, v (projection
    outputs before RoPE, (B, T, H*E) and (B, T, K*E)), z (input of o_proj, (B, T, H*E): the heads'
    outputs side by side), attn_out (o_proj output), resid_mid, mlp_in, gate, up, mlp_act (input of
    down_proj), mlp_out.
    `patch` maps names to tensors that replace the activation. With `grads=True` every recorded tensor
    keeps its gradient (`.grad` after backward): the scores need dR/dy at every component's output.
    """

    def __init__(self, patch=None, grads=False):
        super().__init__()
        self.patch = patch or {}
        self.grads = grads

    def __call__(self, name, x):
        if name in self.patch:
            x = self.patch[name]
        if self.grads:
            if not x.requires_grad:    # the embedding output (frozen weights): make it the leaf we differentiate from
                x.requires_grad_()
            x.retain_grad()
        self[name] = x
        return x


def _tap(taps, name, x):
    return x if taps is None else taps(name, x)


# --- building blocks ------------------------------------------------------------------------------

def upcast(x):
    """At least fp32: norms, RoPE and softmax never run in half precision (fp64 stays fp64 for tests)."""
    return x if x.dtype == torch.float64 else x.float()


def matmul_dtype(x, proj):
    """x in the dtype of `proj`'s matmul (its bf16 copy's, or autocast's if on): a sublayer's input, cast once
    rather than in each of its projections."""
    if proj.lowp is not None:
        return x.to(proj.lowp.dtype)
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class LowpMatmul(torch.autograd.Function):
    """y = x W^T + b from a low-precision copy of W (and b), whose gradient goes to the fp32 master W: the forward
    and both backward matmuls read the copy, so no weight is cast per matmul (run_setup/precision.py keeps the
    copy fresh). The weight gradient is the product of the same bf16 values by an fp32 kernel, returned in fp32:
    autocast's is a bf16 matmul whose result is rounded to bf16 and then cast to fp32 for the master (one more
    write and read of every weight's size a step: 2-3% of an AMX Xeon's step, bench/README.md); ours is not rounded.
    backend.linear / matmul: torch's bf16 kernels, or on a CPU without bf16 instructions fp32 ones on bf16 values."""

    @staticmethod
    def forward(ctx, x, weight, bias, lowp, lowp_bias):
        x = x.to(lowp.dtype)
        ctx.save_for_backward(x, lowp)
        ctx.has_bias = bias is not None
        return backend.linear(x, lowp, lowp_bias)                 # (..., O) in the copy's dtype

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors                                  # (..., I), (O, I)
        g = g.to(w.dtype)                                         # (..., O)
        gx = backend.matmul(g, w) if ctx.needs_input_grad[0] else None                # (..., I)
        gw = gb = None
        if ctx.needs_input_grad[1]:
            gw = g.reshape(-1, g.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()  # (O, I) fp32
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).float().sum(0)        # (O,) summed in fp32
        return gx, gw, gb, None, None


class Linear(nn.Linear):
    """nn.Linear (the same parameters and keys) whose matmul reads `lowp`, a bf16 copy of its weight, when one is
    set (run_setup/precision.py); otherwise exactly nn.Linear."""
    lowp = lowp_bias = None

    def forward(self, x):
        if self.lowp is None:
            return super().forward(x)
        return LowpMatmul.apply(x, self.weight, self.bias, self.lowp, self.lowp_bias)


class Norm(nn.Module):
    """RMSNorm (Llama, Qwen 2, OLMo 2), RMSNorm with (1 + w) (Gemma 2, 3), or parameter-free LayerNorm (OLMo)."""

    def __init__(self, dim, kind, eps):
        super().__init__()
        self.kind, self.eps = kind, eps
        if kind != "layernorm_noparam":
            # Gemma stores w with the norm computing x * (1 + w): zeros are the identity
            self.weight = nn.Parameter(torch.zeros(dim) if kind == "rms_plus_one" else torch.ones(dim))

    def forward(self, x):
        xf = upcast(x)                                            # norms in fp32
        if self.kind == "layernorm_noparam":                      # OLMo: eps fixed at 1e-5
            return F.layer_norm(xf, xf.shape[-1:], eps=1e-5).to(x.dtype)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "rms_plus_one":                           # Gemma: scale in fp32, then cast
            return (xf * (1.0 + upcast(self.weight))).to(x.dtype)
        return self.weight * xf.to(x.dtype)                       # Llama: cast, then scale


def rope_tables(cfg: Config, T, device, local=False):
    """cos, sin of shape (T, E) for rotate-half RoPE, fp32. `local`: the table of the sliding-window layers
    (Gemma 3: its own base, never scaled)."""
    E = cfg.head_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, E, 2, dtype=torch.float64, device=device) / E)
    if cfg.rope_linear is not None and not local:                 # Gemma 3 4B+: positions / factor
        inv_freq = inv_freq / cfg.rope_linear
    if cfg.rope_llama3 is not None:
        # Llama 3.1: slow down low frequencies by `factor`, keep high ones, interpolate in between
        factor, lo, hi, old_len = cfg.rope_llama3
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq.float()[None]  # (T, E/2)
    angles = torch.cat([angles, angles], dim=-1)                  # (T, E): rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, T, n, E); rotate pairs (i, i + E/2): the Hugging Face checkpoint convention."""
    xf = upcast(x)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H, K, E, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
        self.q_proj = Linear(D, H * E, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, K * E, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, K * E, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * E, D, bias=cfg.o_bias)
        if cfg.qk_norm == "all_heads":                            # OLMo 2: over all heads at once
            self.q_norm = Norm(H * E, "rms", cfg.norm_eps)
            self.k_norm = Norm(K * E, "rms", cfg.norm_eps)
        elif cfg.qk_norm == "per_head":                           # Gemma 3: each head's E dims, weight (1 + w)
            self.q_norm = Norm(E, cfg.norm, cfg.norm_eps)
            self.k_norm = Norm(E, cfg.norm, cfg.norm_eps)

    def forward(self, x, rope, mask, window, taps, pre):
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = _tap(taps, pre + "q", self.q_proj(x))                 # (B, T, H*E)
        k = _tap(taps, pre + "k", self.k_proj(x))                 # (B, T, K*E)
        v = _tap(taps, pre + "v", self.v_proj(x))                 # (B, T, K*E)
        if cfg.clip_qkv is not None:                              # OLMo
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        if cfg.qk_norm == "all_heads":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, H, E), k.view(B, T, K, E)             # (B, T, H, E), (B, T, K, E)
        if cfg.qk_norm == "per_head":                             # Gemma 3: before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, *rope)                                  # (B, T, H, E)
        k = apply_rope(k, *rope)                                  # (B, T, K, E)
        v = v.view(B, T, K, E)
        z = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),   # (B, H, T, E)
                      scale=cfg.attn_scale, softcap=cfg.attn_softcap, window=window,
                      attention_mask=mask)
        z = _tap(taps, pre + "z", z.transpose(1, 2).reshape(B, T, H * E))         # (B, T, H*E)
        return self.o_proj(z)                                     # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.act = F.silu if cfg.activation == "silu" else (lambda x: F.gelu(x, approximate="tanh"))
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x, taps, pre):
        gate = _tap(taps, pre + "gate", self.gate_proj(x))        # (B, T, F)
        up = _tap(taps, pre + "up", self.up_proj(x))              # (B, T, F)
        h = _tap(taps, pre + "mlp_act", self.act(gate) * up)      # (B, T, F): SwiGLU / GeGLU
        return self.down_proj(h)                                  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: Config, i: int):
        super().__init__()
        self.cfg, self.i = cfg, i
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        n = lambda: Norm(cfg.dim, cfg.norm, cfg.norm_eps)        # OLMo: parameter-free, so no keys
        if not cfg.post_norms:                                    # OLMo 2 has no pre-norms
            self.input_layernorm = n()
        self.post_attention_layernorm = n()                       # pre-MLP (Llama), post-attention (OLMo 2, Gemma)
        if cfg.sandwich_norms:                                    # Gemma 2, 3
            self.pre_feedforward_layernorm = n()
        if cfg.post_norms or cfg.sandwich_norms:
            self.post_feedforward_layernorm = n()
        self.window = cfg.sliding_window if i in cfg.sliding_layers else None
        # the key of this layer's RoPE table in what Transformer.prepare returns (Gemma 3: local or global)
        self.rope_key = "sliding_attention" if i in cfg.sliding_layers else "full_attention"

    def attn_sublayer(self, resid, rope, mask, taps=None):
        """The attention's write into the residual stream, from the residual stream `resid`; `rope` as
        Transformer.prepare returns it (this layer picks its own table)."""
        pre, cfg = f"layers.{self.i}.", self.cfg
        x = resid if cfg.post_norms else self.input_layernorm(resid)
        x = _tap(taps, pre + "attn_in", matmul_dtype(x, self.self_attn.q_proj))
        out = self.self_attn(x, rope[self.rope_key], mask, self.window, taps, pre)
        out = _tap(taps, pre + "attn_out", out)
        if cfg.post_norms or cfg.sandwich_norms:
            out = self.post_attention_layernorm(out)
        return out

    def mlp_sublayer(self, resid, taps=None):
        """The MLP's write into the residual stream, from the residual stream `resid`."""
        pre, cfg = f"layers.{self.i}.", self.cfg
        if cfg.post_norms:
            x = resid
        elif cfg.sandwich_norms:
            x = self.pre_feedforward_layernorm(resid)
        else:
            x = self.post_attention_layernorm(resid)
        x = _tap(taps, pre + "mlp_in", matmul_dtype(x, self.mlp.gate_proj))
        out = _tap(taps, pre + "mlp_out", self.mlp(x, taps, pre))
        if cfg.post_norms or cfg.sandwich_norms:
            out = self.post_feedforward_layernorm(out)
        return out

    def forward(self, h, rope, mask, taps=None):
        pre = f"layers.{self.i}."
        h = _tap(taps, pre + "resid_pre", h)
        h = _tap(taps, pre + "resid_mid", h + self.attn_sublayer(h, rope, mask, taps))
        return h + self.mlp_sublayer(h, taps)


class Embedding(nn.Embedding):
    """nn.Embedding (the same parameter and key) without its random init: every model here is built on the meta
    device and then filled (checkpoint.from_pretrained, dist.load_sharded), and on meta normal_ is a Python
    decomposition whose first call imports sympy: 1.1 s of the 25-s default job, for numbers never used."""

    def reset_parameters(self):
        pass


class Body(nn.Module):
    """Holds the keys under `model.` of a Hugging Face checkpoint."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = Norm(cfg.dim, cfg.norm, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.source = None             # the checkpoint directory, set by checkpoint.from_pretrained

    @property
    def layers(self):
        return self.model.layers

    def prepare(self, input_ids, attention_mask=None):
        """What every layer needs besides the residual stream: (rope, mask), the same for every block.
        rope maps a layer type to its (cos, sin) tables, both (T, E): one table for all layers, except
        Gemma 3, whose sliding-window layers have a RoPE base of their own."""
        cfg, T, dev = self.config, input_ids.shape[1], input_ids.device
        full = rope_tables(cfg, T, dev)
        local = rope_tables(cfg, T, dev, local=True) if cfg.rope_local_theta is not None else full
        return {"full_attention": full, "sliding_attention": local}, attention_mask

    def hidden(self, input_ids, attention_mask=None, taps=None):
        """Final-normed hidden states (B, T, D). Right padding keeps positions 0..n-1 for real tokens."""
        rope, mask = self.prepare(input_ids, attention_mask)
        h = self.model.embed_tokens(input_ids)                     # (B, T, D)
        if self.config.embed_scale:                               # Gemma 2, 3: sqrt(D), rounded to the dtype
            h = h * torch.tensor(self.config.dim ** 0.5, dtype=h.dtype)
        for block in self.model.layers:
            h = block(h, rope, mask, taps)
        return self.model.norm(h)

    def head_weight(self):
        """(V, D): the output head, which is the token embedding in tied checkpoints."""
        return self.model.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def logits(self, h, weight=None):
        """The output head at whatever positions `h` holds, (..., D) -> (..., V) fp32 logits. `weight`: a copy
        of head_weight() in another dtype (train.py's bf16 head); by default the head itself."""
        logits = upcast(backend.linear(h, self.head_weight() if weight is None else weight))
        if self.config.final_softcap is not None:                 # Gemma 2: soft-capped logits
            c = self.config.final_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def forward(self, input_ids, attention_mask=None, taps=None):
        return self.logits(self.hidden(input_ids, attention_mask, taps))   # (B, T, V)
