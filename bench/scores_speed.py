"""Our scores (scores.linearized, eqs. 4-9) against the same scores written with `transformers`, on CPU, in one run.

The peer (hf_linearized) computes what scores.linearized computes, with a Llama-family `transformers` model as
its users would reach inside it: forward hooks on every projection keep its input and output (and the output's
gradient), pass 1 and pass 2 are forward + backward through the whole model at W and W', eq. 6's g' comes from one
partial pass per layer through the model's own decoder layers, and pass 3 runs each layer's attention and MLP at W
on its W' input. The arithmetic after the passes (a weight change times an input, dotted with a gradient) is
written out here; the prompts, their alignment and y* (scores.make_prompts, aligned_mean_of_others) are ours,
being bookkeeping, not passes. tests/test_bench_contenders.py checks that the peer's scores are ours.

Contenders: ours in fp32 (what scores.py runs: the scores are fp32 always, run_setup/precision.py), transformers
in fp32 and under bf16 autocast (its passes' matmuls in bf16). Rounds in rotating order, one process; medians and
ratios. Every run first prints the CPU and its bf16 matrix instructions (AMX, AVX512-BF16 or neither).

    python bench/scores_speed.py [--finetuned runs/first_hop] [--dataset first_hop] [--rounds 3]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):                                     # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data                                                       # noqa: E402
import scores as S                                                # noqa: E402
from checkpoint_io.checkpoint import from_pretrained, load_tokenizer, resolve   # noqa: E402
from model import upcast as up                                    # noqa: E402  fp32 at least; fp64 stays
from run_setup import cli, precision                              # noqa: E402
from run_setup.progress import progress                           # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Recorder:
    """Forward hooks on every decoder layer of a `transformers` Llama-family model: each projection's input and
    output by (layer, name), the outputs' gradients kept (retain_grad), each layer's input (resid_pre) and the
    attention mask and rotary embeddings the model hands its layers. `store` is where the next forward writes."""

    def __init__(self, model):
        self.store, self.handles = {}, []
        for l, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_in(l), with_kwargs=True))
            for part in (layer.self_attn, layer.mlp):
                for name in PROJ:
                    if hasattr(part, name):
                        self.handles.append(getattr(part, name).register_forward_hook(self._proj(l, name)))

    def _layer_in(self, l):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.store[l, "resid_pre"] = h
            self.store["layer_kwargs"] = {k: kwargs.get(k) for k in ("attention_mask", "position_embeddings")}
        return hook

    def _proj(self, l, name):
        def hook(module, args, out):
            self.store[l, name + ".in"], self.store[l, name] = args[0], out
            if out.requires_grad:
                out.retain_grad()
                args[0].retain_grad()                             # o_proj's input z: dR/dz for the heads
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def hf_reward(model, ids, mask, correct, cands, hidden=None):
    """R (N,) of data.reward from a `transformers` model: the head at the last prompt positions only."""
    N = ids.shape[0]
    if hidden is None:
        emb = model.model.embed_tokens(ids).detach().requires_grad_(True)   # frozen weights: grads flow from here
        hidden = model.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state   # (N, T, D), final-normed
    else:
        hidden = model.model.norm(hidden)
    last = mask.sum(1) - 1
    logits = up(model.lm_head(hidden[torch.arange(N), last]))                       # (N, V)
    return data.reward(logits, correct, cands)


def record(model, rec, b):
    """Pass 1 or 2: forward + backward of sum R at this model; its activations and their gradients."""
    rec.store = {}
    hf_reward(model, b.ids, b.mask, b.correct, b.cands).sum().backward()
    kept, rec.store = rec.store, {}                               # later forwards write elsewhere
    return kept


def doubled(x, n):
    """The layers' keyword arguments for a batch of 2N: tensors with a batch dimension of N repeated."""
    if isinstance(x, tuple):
        return tuple(doubled(t, n) for t in x)
    if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n:
        return torch.cat([x, x])
    return x


def out0(x):
    return x[0] if isinstance(x, tuple) else x                    # decoder layers return a tensor (5.x) or tuple


def hf_linearized(hf_a, hf_b, b):
    """scores.linearized(., ., b)'s per-prompt scores, {kind.comp: (N, T, L) or (N, T, L, H)}, from `transformers`
    models W = hf_a and W' = hf_b (Llama family, no biases)."""
    cfg = hf_a.config
    H, K, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    G, (N, T) = H // K, b.ids.shape
    rec_a, rec_b = Recorder(hf_a), Recorder(hf_b)
    try:
        ta = record(hf_a, rec_a, b)                               # pass 1, at W
        tb = record(hf_b, rec_b, b)                               # pass 2, at W'
        kw = ta["layer_kwargs"]
        kw2 = {k: doubled(v, N) for k, v in kw.items()}
        ids2, mask2, correct2 = b.ids.repeat(2, 1), b.mask.repeat(2, 1), b.correct.repeat(2)   # (2N, ...)
        # eq. 6's g': per layer l, the heads at W then layer l's MLP at W', and the MLP at W; later layers at W'
        g_attn, g_mlp = {}, {}
        A, B = hf_a.model.layers, hf_b.model.layers
        for l in progress(range(L), "transformers: eq. 6's partial passes", L, "layer"):
            rec_a.store, rec_b.store = {}, {}                     # the hooks' records of these passes: unused
            h0 = ta[l, "resid_pre"].detach()
            with torch.no_grad():
                y_head = out0(A[l].self_attn(A[l].input_layernorm(h0), **kw))
                mid_w = h0 + ta[l, "o_proj"].detach()             # resid_mid at W
                y_mlp = A[l].mlp(A[l].post_attention_layernorm(mid_w))
            y_head, y_mlp = y_head.detach().requires_grad_(True), y_mlp.detach().requires_grad_(True)  # the leaves
            mid = h0 + y_head
            h = torch.cat([mid + B[l].mlp(B[l].post_attention_layernorm(mid)), mid_w + y_mlp])   # (2N, T, D)
            for blk in B[l + 1:]:
                h = out0(blk(h, **kw2))
            hf_reward(hf_b, ids2, mask2, correct2, b.cands, hidden=h).sum().backward()
            g_attn[l], g_mlp[l] = y_head.grad, y_mlp.grad
        # pass 3 and the scores, layer by layer
        out = {}
        per_head = lambda u, v, n: (u * v).reshape(N, T, n, -1).sum(-1)                  # (N, T, n)
        with torch.no_grad():
            for l in range(L):
                a = lambda name: up(ta[l, name].detach())
                g = lambda t, name: up(t[l, name].grad)
                dW = lambda part, name: (getattr(getattr(hf_b.model.layers[l], part), name).weight
                                         - getattr(getattr(hf_a.model.layers[l], part), name).weight)
                chg = lambda part, name: a(name + ".in") @ dW(part, name).T                # dW x, (N, T, O)
                # informative (eq. 4/7): q rows, o columns per head; k, v rows per kv head, split over G heads
                inf_h = per_head(g(ta, "q_proj"), chg("self_attn", "q_proj"), H)
                kv = per_head(g(ta, "k_proj"), chg("self_attn", "k_proj"), K) + \
                    per_head(g(ta, "v_proj"), chg("self_attn", "v_proj"), K)
                inf_h = inf_h + kv.repeat_interleave(G, dim=-1) / G
                inf_h = inf_h + per_head(g(ta, "o_proj") @ dW("self_attn", "o_proj"), a("o_proj.in"), H)
                inf_down = (g(ta, "down_proj") * chg("mlp", "down_proj")).sum(-1)
                inf_m = (g(ta, "gate_proj") * chg("mlp", "gate_proj")).sum(-1) + \
                    (g(ta, "up_proj") * chg("mlp", "up_proj")).sum(-1) + inf_down
                # pass 3: layer l's attention and MLP at W on their W' inputs (eq. 5/8)
                rec_a.store = {}
                blk = hf_a.model.layers[l]
                hb = tb[l, "resid_pre"].detach()
                blk.self_attn(blk.input_layernorm(hb), **kw)
                blk.mlp(blk.post_attention_layernorm(hb + tb[l, "o_proj"].detach()))
                tc = rec_a.store
                # a head's write is W_o[:, h] z_h, so its downstream score is (dR/dz)_h . (z_h on W' input - z_h)
                down_h = per_head(g(ta, "o_proj.in"), up(tc[l, "o_proj.in"]) - a("o_proj.in"), H)
                down_m = (g(ta, "down_proj") * (up(tc[l, "down_proj"]) - a("down_proj"))).sum(-1)
                # upstream (eq. 6/9) and the authors' variant: (g' - g) . (y - y*)
                z, y = a("o_proj.in"), a("down_proj")
                dz = z - S.aligned_mean_of_others(z, b.pos, b.Ta)
                dy = y - S.aligned_mean_of_others(y, b.pos, b.Ta)
                Wo = blk.self_attn.o_proj.weight
                got = {"informative.mlp": inf_m, "informative.attn": inf_h, "informative_down.mlp": inf_down,
                       "downstream.mlp": down_m, "downstream.attn": down_h,
                       "upstream.attn": per_head((up(g_attn[l]) - g(ta, "o_proj")) @ Wo, dz, H),
                       "upstream.mlp": ((up(g_mlp[l]) - g(ta, "down_proj")) * dy).sum(-1),
                       "upstream_authors.attn": per_head((g(tb, "o_proj") - g(ta, "o_proj")) @ Wo, dz, H),
                       "upstream_authors.mlp": ((g(tb, "down_proj") - g(ta, "down_proj")) * dy).sum(-1)}
                for k, v in got.items():
                    out.setdefault(k, []).append(v.float())
    finally:
        rec_a.remove(), rec_b.remove()
    return {k: torch.stack(v, dim=2) for k, v in out.items()}    # (N, T, L) or (N, T, L, H)


def contender(kind, ours, hf, b):
    """One contender's per-prompt scores: `ours` and `hf` are (W, W') pairs of our and `transformers` models."""
    if kind == "ours-fp32":
        return S.linearized(*ours, b)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "transformers-bf16"):
        return hf_linearized(*hf, b)


def load_hf(path, dtype=torch.float32):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    return model.requires_grad_(False)


def agreement(x, ref, mask):
    """Pearson r and the largest difference relative to the largest |ref|, over real positions (not padding)."""
    keep = mask.bool()
    x, ref = x[keep].flatten().double(), ref[keep].flatten().double()
    r = torch.corrcoef(torch.stack([x, ref]))[0, 1].item()
    return r, ((x - ref).abs().max() / ref.abs().max()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="W: the base checkpoint (Llama family for the peer)")
    p.add_argument("--finetuned", default="runs/first_hop", help="W': the finetuned checkpoint (train.py's output)")
    p.add_argument("--dataset", default="first_hop", help="dataset whose implications are scored")
    p.add_argument("--rounds", type=cli.positive_int, default=3, help="rounds of the contenders, in rotating order")
    p.add_argument("--contenders", default="ours-fp32,transformers,transformers-bf16",
                   help="comma-separated subset")
    p.add_argument("--threads", type=cli.positive_int, default=torch.get_num_threads(), help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {precision.cpu_name()}; bf16 matrix instructions: {precision.cpu_isa()}; torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.threads} threads", flush=True)
    if not Path(args.finetuned).is_dir():
        sys.exit(f"error: no checkpoint at {args.finetuned}: run `python train.py --dataset {args.dataset}` first")
    kinds = args.contenders.split(",")
    unknown = set(kinds) - {"ours-fp32", "transformers", "transformers-bf16"}
    if unknown:
        sys.exit(f"error: unknown contender(s) {', '.join(sorted(unknown))}: choose among ours-fp32, transformers, "
                 "transformers-bf16")
    path_a = resolve(args.model)
    tok = load_tokenizer(path_a)
    b = S.make_prompts(tok, data.load_dataset(args.dataset)["implications"])
    ours = (from_pretrained(path_a).requires_grad_(False), from_pretrained(args.finetuned).requires_grad_(False)) \
        if "ours-fp32" in kinds else None
    hf = (load_hf(path_a), load_hf(args.finetuned)) if any(k.startswith("transformers") for k in kinds) else None
    if hf and hf[0].config.model_type != "llama":
        sys.exit(f"error: the transformers peer is written for the Llama family (SmolLM2, Llama 3), not "
                 f"{hf[0].config.model_type!r}: give a Llama checkpoint as --model, or --contenders ours-fp32")
    print(f"{args.dataset} implications: {b.ids.shape[0]} prompts, {b.ids.shape[1]} positions; W {args.model}, "
          f"W' {args.finetuned}", flush=True)
    times, last = {k: [] for k in kinds}, {}
    for r in range(args.rounds):
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            t0 = time.perf_counter()
            last[k] = contender(k, ours, hf, b)
            times[k].append(time.perf_counter() - t0)
            print(f"round {r} {k:>18} {times[k][-1]:7.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in kinds:
        print(f"{k:>18}: median {med[k]:7.1f} s (runs {', '.join(f'{t:.1f}' for t in times[k])})")
    if "ours-fp32" in kinds:
        for k in kinds:
            if k != "ours-fp32":
                print(f"ours fp32 against {k}: {med[k] / med['ours-fp32']:.2f}x (medians)")
                agree = [agreement(last[k][key], last["ours-fp32"][key], b.mask) for key in last[k]]
                print(f"  the scores of {k} against ours, every kind: Pearson r >= {min(r for r, _ in agree):.5f}, "
                      f"largest difference {max(d for _, d in agree):.1e} of the largest score")


if __name__ == "__main__":
    main()
