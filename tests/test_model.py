"""Our model against `transformers` (the reference), family by family, on tiny random checkpoints."""
import json

import pytest
import torch

from checkpoint_io import checkpoint as C
import model as M

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.2)          # large enough that soft-caps and windows matter

FAMILIES = {
    # Llama 3.1-style: llama3 RoPE scaling, untied head
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False, rope_theta=50000.0,
                                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 16}),
    "llama_tied": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=True),
    "olmo": lambda: transformers.OlmoConfig(**TINY, clip_qkv=0.5, pad_token_id=0),
    "olmo2": lambda: transformers.Olmo2Config(**TINY, pad_token_id=0),
    "gemma2": lambda: transformers.Gemma2Config(**TINY, head_dim=32, query_pre_attn_scalar=24,
                                                sliding_window=5, attn_logit_softcapping=2.0,
                                                final_logit_softcapping=5.0, pad_token_id=0),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=False),
    # Gemma 3: per-head q/k norms, a local and a global RoPE base, linear scaling of the global one (4B+),
    # one key/value head (as the 270M and 1B)
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**TINY, "num_key_value_heads": 1}, head_dim=32, query_pre_attn_scalar=24, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}}),
    # Mistral: Llama with a sliding window on every layer
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=5, head_dim=24),
}


def save_tiny(family, path, shard=None):
    torch.manual_seed(0)
    cfg = FAMILIES[family]()
    ref = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():                     # random norm weights and biases, so that none is trivially 1 or 0
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    kw = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(path, safe_serialization=True, **kw)
    return ref


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, tmp_path, padded_batch):
    ref = save_tiny(family, tmp_path)
    ours = C.from_pretrained(tmp_path)
    assert set(ours.state_dict()) | {"lm_head.weight"} >= set(ref.state_dict())
    ids, mask = padded_batch
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
        got_unpadded = ours(ids[2:, :3])     # the padded row equals the same sequence without padding
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 1e-4
    assert (got[2, :3] - got_unpadded[0]).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral"])
def test_longer_than_window(family, tmp_path):
    ref = save_tiny(family, tmp_path)
    ours = C.from_pretrained(tmp_path)
    assert ours.layers[0].window == 5 and ours.layers[1].window == (5 if family == "mistral" else None)
    ids = torch.randint(3, 101, (2, 23), generator=torch.Generator().manual_seed(2))   # 23 > window 5
    with torch.no_grad():
        diff = (ours(ids) - ref(input_ids=ids).logits).abs().max()
    assert diff < 1e-4
    ours.layers[0].window = None             # the window matters: without it the logits differ
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max() > 1e-3


def test_sharded_checkpoint(tmp_path, padded_batch):
    ref = save_tiny("llama", tmp_path, shard="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = C.from_pretrained(tmp_path)
    ids, mask = padded_batch
    with torch.no_grad():
        assert (ours(ids, mask)[mask.bool()] - ref(input_ids=ids, attention_mask=mask).logits[mask.bool()]).abs().max() < 1e-4


def test_taps_record_and_patch(tmp_path, padded_batch):
    save_tiny("llama", tmp_path)
    m = C.from_pretrained(tmp_path)
    ids, mask = padded_batch
    taps = M.Taps()
    with torch.no_grad():
        base = m(ids, mask, taps=taps)
    z = taps["layers.1.z"]
    assert z.shape == (3, 12, 4 * 16) and taps["layers.2.mlp_out"].shape == (3, 12, 64)
    # the head outputs z feed o_proj: attn_out is exactly o_proj(z)
    assert torch.allclose(m.layers[1].self_attn.o_proj(z), taps["layers.1.attn_out"])
    # patching a component's output changes the logits; patching it with its own value does not
    with torch.no_grad():
        same = m(ids, mask, taps=M.Taps(patch={"layers.1.z": z}))
        other = m(ids, mask, taps=M.Taps(patch={"layers.1.z": torch.zeros_like(z)}))
    assert torch.equal(same, base) and (other - base).abs().max() > 1e-3


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint directory"):               # checkpoint.UserError
        C.from_pretrained(tmp_path / "missing")
    save_tiny("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
        C.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])    # truncated download
    with pytest.raises(ValueError, match="truncated or corrupt"):
        C.from_pretrained(tmp_path)


def test_bf16_sublayer_inputs_are_cast_once(tmp_path, monkeypatch, padded_batch):
    """Under autocast each sublayer's normed input is cast to bf16 once (model.matmul_dtype), not by each of its
    projections: the same logits bit for bit, and the weight gradients within bf16 rounding (the projections'
    input gradients are then summed in bf16)."""
    save_tiny("llama", tmp_path)
    m = C.from_pretrained(tmp_path)
    ids, mask = padded_batch

    def run():
        taps = M.Taps()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(ids, mask, taps=taps)
        w = m.layers[0].input_layernorm.weight
        return logits, torch.autograd.grad(logits[mask.bool()].logsumexp(-1).sum(), w)[0], taps["layers.0.attn_in"]
    logits, grad, attn_in = run()
    monkeypatch.setattr(M, "matmul_dtype", lambda x, proj: x)               # each projection casts its own input
    ref_logits, ref_grad, ref_in = run()
    assert attn_in.dtype == torch.bfloat16 and ref_in.dtype == torch.float32
    assert torch.equal(logits, ref_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=2e-2 * ref_grad.abs().max().item())


def test_loading_runs_no_random_init_on_meta(default_ckpt):
    """A model is built on the meta device and filled from its checkpoint: no random init runs, so the meta
    kernels of normal_ (Python decompositions that import sympy, about a second) are never reached. In a fresh
    process: this one has imported sympy with transformers."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; from checkpoint_io.checkpoint import from_pretrained; "
            f"m = from_pretrained({str(default_ckpt)!r}); assert 'sympy' not in sys.modules, 'sympy was imported'; "
            "assert m.model.embed_tokens.weight.abs().sum() > 0")
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
