"""Informative, downstream and upstream scores of every MLP and attention head, at every position (paper Sec. 4).

    python scores.py ckpt_a ckpt_b [--dataset NAME] [--out DIR] [--exact]

W = ckpt_a (before finetuning), W' = ckpt_b (after). The reward R of an implication prompt is the logit of its
answer's first token minus the mean logit of all candidates' first tokens, at the last prompt position.
A component c is an MLP (maps gate, up, down) or an attention head (its rows of q, k, v and its columns of o);
its output y_c is what it writes into the residual stream: mlp_out, or W_o[:, head] z_head for a head.

Linearized scores, eqs. 4-9, from three batched passes over all prompts:
  pass 1  forward + backward at W:  map inputs x, output gradients g = dR/dy (the "y-check" of eq. 7)
  pass 2  forward + backward at W': gradients g' (eq. 9), and the residual stream z' feeding each component
  pass 3  forward at W of every component on its W' input: f_c(z'_c, W_c) (eq. 5)
  informative  I_c = sum over c's maps of g . (dW x)                        eq. 4 / 7
  downstream   D_c = g_c . (f_c(z'_c, W_c) - y_c)                          eq. 5 / 8
  upstream     U_c = (g'_c - g_c) . (y_c - y*_c),  y* = mean over the other prompts   eq. 6 / 9
Grouped-query attention: a key/value head is shared by G = H/K query heads; its k and v informative
terms are split equally among them (sums over heads stay exact).
Positions are aligned by template: the tokens all prompts share at the start, the slot (right-aligned),
the tokens all prompts share at the end. Scores are averaged over prompts on one anchor prompt's positions.

--exact computes the causal scores of eqs. 1-3 by real interventions (summed over positions) and reports how
well the linearized scores approximate them.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

import data
from kernels.grad_delta import grad_delta
from model import Taps, config_diff, from_pretrained, load_tokenizer, resolve, write_text_atomic

MLP_MAPS = ("gate_proj", "up_proj", "down_proj")


# --- positions: align prompts of one template -------------------------------------------------------

def align(ids, lengths):
    """Map each prompt's positions onto the anchor prompt's: (anchor index, (N, T) map, -1 = padding)."""
    seqs = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    if len({s[-1] for s in seqs}) > 1:
        raise ValueError("the prompts do not share one template (their last tokens differ); scores align "
                         "positions by template, so use prompts that differ only in one slot")
    prefix = 0                                                     # tokens shared at the start
    while all(len(s) > prefix + 1 for s in seqs) and len({s[prefix] for s in seqs}) == 1:
        prefix += 1
    suffix = 1                                                     # tokens shared at the end
    while all(len(s) > prefix + suffix for s in seqs) and len({s[-suffix - 1] for s in seqs}) == 1:
        suffix += 1
    anchor = max(range(len(seqs)), key=lambda i: (lengths[i], -i))  # the longest slot: every prompt fits
    Ta = lengths[anchor]
    pos = torch.full(ids.shape, -1, dtype=torch.long)
    for i, n in enumerate(lengths):
        t = torch.arange(n)
        # prefix keeps its index; slot and suffix are right-aligned with the anchor's end
        pos[i, :n] = torch.where(t < prefix, t, t + Ta - n)
    return anchor, pos


def aligned_mean_of_others(y, pos, Ta):
    """y* of eq. 3/6: at each position, the mean of the same component's output over the OTHER prompts
    at the aligned position (a mean ablation). y (N, T, ...) -> (N, T, ...); where no other prompt has the
    position, y* = y (no ablation)."""
    N, T = pos.shape
    real = pos >= 0
    idx = pos.clamp(min=0)
    flat = y.reshape(N, T, -1)
    total = torch.zeros(Ta, flat.shape[-1], dtype=y.dtype).index_add_(0, idx[real], flat[real])   # (Ta, ...)
    count = torch.zeros(Ta, dtype=y.dtype).index_add_(0, idx[real], torch.ones_like(idx[real], dtype=y.dtype))
    others = (count[idx] - 1)[..., None]                           # (N, T, 1)
    ystar = torch.where(others > 0, (total[idx] - flat) / others.clamp(min=1), flat)
    return ystar.view_as(y)


def to_anchor(s, pos, Ta):
    """Per-prompt scores (N, T, ...) -> mean over prompts on the anchor's positions (Ta, ...)."""
    real = pos >= 0
    out = torch.zeros((Ta,) + s.shape[2:], dtype=s.dtype)
    return out.index_add_(0, pos[real], s[real]) / s.shape[0]


# --- the prompts, batched -----------------------------------------------------------------------------

@dataclass
class Prompts:
    ids: torch.Tensor          # (N, T) right-padded token ids
    mask: torch.Tensor         # (N, T) 1 = real token
    correct: torch.Tensor      # (N,) first token of each prompt's answer
    cands: torch.Tensor        # (C,) first tokens of all candidate answers
    pos: torch.Tensor          # (N, T) aligned (anchor) position of each token, -1 for padding
    Ta: int                    # number of anchor positions
    anchor: int                # index of the anchor prompt

    def subset(self, rows):
        return Prompts(self.ids[rows], self.mask[rows], self.correct[rows], self.cands, self.pos[rows],
                       self.Ta, self.anchor)


def make_prompts(tokenizer, examples, device="cpu"):
    if not examples:
        raise ValueError("the dataset has no implication prompts to score")
    ids, mask = data.encode_prompts(tokenizer, [e.prompt for e in examples])
    _, cands, index = data.candidates(tokenizer, examples)         # checks the first tokens are distinct
    correct = cands[index]
    lengths = mask.sum(1).tolist()
    anchor, pos = align(ids, lengths)
    to = lambda t: t.to(device)
    return Prompts(to(ids), to(mask), to(correct), to(cands), pos, lengths[anchor], anchor)


# --- the passes -------------------------------------------------------------------------------------

def rewards(model, b, taps=None):
    """R for every prompt (N,), read at the last prompt positions."""
    return data.reward(data.logits_at_last(model, b.ids, b.mask, taps), b.correct, b.cands)


def record(model, b):
    """Forward + backward: every activation and its gradient dR/d(activation), by name."""
    taps = Taps(grads=True)
    rewards(model, b, taps).sum().backward()                      # prompts are independent: sum = per prompt
    return taps


def weight_delta(model_a, model_b, layer, name):
    pa = dict(model_a.layers[layer].named_parameters())
    pb = dict(model_b.layers[layer].named_parameters())
    return pb[name] - pa[name] if name in pa else None


def linearized(model_a, model_b, b):
    """Per-prompt, per-position scores: dict of (N, T, L) for MLPs and (N, T, L, H) for heads."""
    cfg = model_a.config
    H, K, E, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    G = H // K
    N, T = b.ids.shape
    rope, mask = model_a.prepare(b.ids, b.mask)
    ta = record(model_a, b)                                    # pass 1, at W
    tb = record(model_b, b)                                    # pass 2, at W'
    out = {f"{s}.{c}": [] for s in ("informative", "downstream", "upstream") for c in ("mlp", "attn")}
    with torch.no_grad():
        for l in range(L):
            p = f"layers.{l}."
            a = lambda name: ta[p + name].detach()
            grad = lambda t, name: t[p + name].grad
            flat = lambda x: x.reshape(N * T, -1)
            delta = lambda name: weight_delta(model_a, model_b, l, name)

            def informative_map(g, x, proj, groups, split):        # eq. 4/7 for one linear map
                s = grad_delta(flat(g), flat(x), delta(proj + ".weight"), groups, split)
                db = delta(proj + ".bias")
                if db is not None:                                 # a bias is a weight whose input is 1
                    gb = flat(g).float() * db.float()              # (N*T, O)
                    # q/k/v biases split by head like their rows; o_proj's bias belongs to no head: equal shares
                    s = s + (gb.view(N * T, groups, -1).sum(-1) if split == "out" else gb.sum(-1, keepdim=True) / groups)
                return s.view(N, T, groups)

            # informative, heads: q rows and o columns per head; k, v rows per kv head, split over its G heads
            attn = "self_attn."
            inf_h = informative_map(grad(ta, "q"), a("attn_in"), attn + "q_proj", H, "out")
            kv = informative_map(grad(ta, "k"), a("attn_in"), attn + "k_proj", K, "out") \
                + informative_map(grad(ta, "v"), a("attn_in"), attn + "v_proj", K, "out")
            inf_h = inf_h + kv.repeat_interleave(G, dim=-1) / G
            inf_h = inf_h + informative_map(grad(ta, "attn_out"), a("z"), attn + "o_proj", H, "in")
            # informative, MLP: all three maps (the reference implementation drops up_proj)
            inf_m = sum(informative_map(grad(ta, m), a(x), "mlp." + m + "_proj", 1, "out")[..., 0]
                        for m, x in (("gate", "mlp_in"), ("up", "mlp_in")))
            inf_m = inf_m + informative_map(grad(ta, "mlp_out"), a("mlp_act"), "mlp.down_proj", 1, "out")[..., 0]

            # pass 3: the components at W on their W' inputs (residual stream from the W' run)
            tc = Taps()
            block = model_a.layers[l]
            block.attn_sublayer(tb[p + "resid_pre"].detach(), rope, mask, tc)
            block.mlp_sublayer(tb[p + "resid_mid"].detach(), tc)
            # a head's write is W_o[:, h] z_h, so g . W_o[:, h] dz_h = (dR/dz)_h . dz_h: the gradient at z
            per_head = lambda u, v: (u * v).view(N, T, H, E).sum(-1)
            gz = grad(ta, "z")                                     # (N, T, H*E) = g_attn_out W_o
            down_h = per_head(gz, tc[p + "z"] - a("z"))            # eq. 5/8
            down_m = (grad(ta, "mlp_out") * (tc[p + "mlp_out"] - a("mlp_out"))).sum(-1)
            # upstream: (g' - g) . (y - y*), with the head's write through W_o at W                 eq. 6/9
            dgz = (grad(tb, "attn_out") - grad(ta, "attn_out")) @ block.self_attn.o_proj.weight   # (N, T, H*E)
            zstar = aligned_mean_of_others(a("z"), b.pos, b.Ta)
            up_h = per_head(dgz, a("z") - zstar)
            ystar = aligned_mean_of_others(a("mlp_out"), b.pos, b.Ta)
            up_m = ((grad(tb, "mlp_out") - grad(ta, "mlp_out")) * (a("mlp_out") - ystar)).sum(-1)

            for key, v in (("informative.mlp", inf_m), ("informative.attn", inf_h), ("downstream.mlp", down_m),
                           ("downstream.attn", down_h), ("upstream.mlp", up_m), ("upstream.attn", up_h)):
                out[key].append(v.float())
    return {k: torch.stack(v, dim=2) for k, v in out.items()}     # (N, T, L) or (N, T, L, H)


# --- exact scores, eqs. 1-3, by intervention ---------------------------------------------------------

def head_params(block_a, block_b, h, cfg):
    """Block parameters at W with head h's weights set to W' (eq. 1): its rows of q, its columns of o, and
    1/G of its key/value head's change (the share the linearized score gives it). New tensors, no in-place."""
    E, G = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    pa, pb = dict(block_a.named_parameters()), dict(block_b.named_parameters())
    new = dict(pa)
    for name in pa:
        proj = name.split(".")[1] if name.startswith("self_attn.") else None
        if proj in ("q_proj", "k_proj", "v_proj"):
            rows = slice(h * E, (h + 1) * E) if proj == "q_proj" else slice(h // G * E, (h // G + 1) * E)
            share = 1.0 if proj == "q_proj" else 1.0 / G
            d = torch.zeros_like(pa[name])
            d[rows] = share * (pb[name] - pa[name])[rows]
            new[name] = pa[name] + d
        elif name == "self_attn.o_proj.weight":
            d = torch.zeros_like(pa[name])
            d[:, h * E:(h + 1) * E] = (pb[name] - pa[name])[:, h * E:(h + 1) * E]
            new[name] = pa[name] + d
    return new


def exact(model_a, model_b, b, rows):
    """Causal scores (eqs. 1-3) of every component, summed over positions, averaged over prompts `rows`.
    Each intervention starts from the cached residual stream at its layer, so it only reruns later layers;
    the H head patches of one layer run together, as H copies of the prompts in one batch."""
    cfg = model_a.config
    H, E, L = cfg.n_heads, cfg.head_dim, cfg.n_layers
    n = len(rows)
    ta = record(model_a, b)                                        # W: residual streams, z, mlp_out
    tb = record(model_b, b)                                        # W': component inputs for pass 3
    s = b.subset(rows)
    rope, mask = model_a.prepare(s.ids, s.mask)
    get = lambda t, name: t[name].detach()[rows]
    A, B = list(model_a.layers), list(model_b.layers)

    def R(first, start, late, reps=1):
        """Mean reward of each of `reps` copies of the prompts, (reps,): `first` maps the residual stream at
        layer `start` to the stream after it; later layers and the final norm come from `late` (W or W')."""
        h = first(get(ta, f"layers.{start}.resid_pre").repeat(reps, 1, 1))       # (reps * n, T, D)
        for blk in late.layers[start + 1:]:
            h = blk(h, rope, mask.repeat(reps, 1), None)
        last = (s.mask.sum(1) - 1).repeat(reps)                               # (reps * n,)
        logits = late.logits(late.model.norm(h)[torch.arange(reps * n), last])
        return data.reward(logits, s.correct.repeat(reps), s.cands).view(reps, n).mean(1)

    def layer(blk, patch=None, params=None, mlp_blk=None):
        """One layer at W (`blk`), optionally with patched activations, swapped parameters, or its MLP
        taken from another block (the W' MLP for the upstream score of a head)."""
        def run(h):
            taps = Taps(patch=patch) if patch else None
            m = mask.repeat(h.shape[0] // n, 1)
            if params is not None:
                return functional_call(blk, params, (h, rope, m, taps))
            h = h + blk.attn_sublayer(h, rope, m, taps)
            return h + (mlp_blk or blk).mlp_sublayer(h, taps)
        return run

    out = {k: torch.zeros(L, H + 1) for k in ("informative", "downstream", "upstream")}   # column H = MLP
    with torch.no_grad():
        R0 = R(layer(A[0]), 0, model_a)
        for l in range(L):
            p = f"layers.{l}."
            z = get(ta, p + "z")                                   # (n, T, H*E)
            zstar = aligned_mean_of_others(ta[p + "z"].detach(), b.pos, b.Ta)[rows]
            ystar = aligned_mean_of_others(ta[p + "mlp_out"].detach(), b.pos, b.Ta)[rows]
            tc = Taps()                                            # pass 3: f_c(z'_c, W_c)
            A[l].attn_sublayer(tb[p + "resid_pre"].detach()[rows], rope, mask, tc)
            A[l].mlp_sublayer(tb[p + "resid_mid"].detach()[rows], tc)

            def each_head(zsrc):                                   # copy h of z has head h's slice from zsrc
                zz = z.repeat(H, 1, 1).view(H, n, -1, H * E)
                for h in range(H):
                    zz[h, ..., h * E:(h + 1) * E] = zsrc[..., h * E:(h + 1) * E]
                return {p + "z": zz.view(H * n, -1, H * E)}

            # heads (columns 0..H-1)
            out["informative"][l, :H] = torch.cat([R(layer(A[l], params=head_params(A[l], B[l], h, cfg)), l,
                                                     model_a) for h in range(H)]) - R0          # eq. 1
            out["downstream"][l, :H] = R(layer(A[l], patch=each_head(tc[p + "z"])), l, model_a, H) - R0   # eq. 2
            ablate = each_head(zstar)
            out["upstream"][l, :H] = (R(layer(A[l], mlp_blk=B[l]), l, model_b)                 # eq. 3
                                      - R(layer(A[l], patch=ablate, mlp_blk=B[l]), l, model_b, H)) \
                - (R0 - R(layer(A[l], patch=ablate), l, model_a, H))
            # the MLP (column H)
            pa, pb = dict(A[l].named_parameters()), dict(B[l].named_parameters())
            mlp_new = {k: (pb[k] if k.startswith("mlp.") else v) for k, v in pa.items()}
            out["informative"][l, H] = R(layer(A[l], params=mlp_new), l, model_a)[0] - R0          # eq. 1
            out["downstream"][l, H] = R(layer(A[l], patch={p + "mlp_out": tc[p + "mlp_out"]}), l, model_a)[0] - R0
            ablate = {p + "mlp_out": ystar}
            out["upstream"][l, H] = (R(layer(A[l]), l, model_b) - R(layer(A[l], patch=ablate), l, model_b))[0] \
                - (R0 - R(layer(A[l], patch=ablate), l, model_a))[0]                            # eq. 3
            print(f"  exact scores: layer {l + 1}/{L}", flush=True)
    return out


# --- outputs: tensors, figure (paper Fig. 3), summary -----------------------------------------------

def pearson(a, b):
    a, b = a.flatten().double() - a.double().mean(), b.flatten().double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-30))


def figure(scores, tokens, path, title):
    """Rows downstream / informative / upstream; columns MLPs and attention (heads summed); layer x position."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 2, figsize=(2 + 0.45 * len(tokens) * 2, 11), squeeze=False)
    for r, kind in enumerate(("downstream", "informative", "upstream")):
        for c, comp in enumerate(("mlp", "attn")):
            v = scores[f"{kind}.{comp}"]
            v = (v.sum(-1) if comp == "attn" else v).T.numpy()     # (L, Ta)
            m = float(abs(v).max()) or 1.0                         # symmetric limits: nothing saturates
            ax = axes[r, c]
            im = ax.imshow(v, cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto", origin="lower",
                           interpolation="nearest")
            ax.set_title(f"{kind}: {'MLP' if comp == 'mlp' else 'attention (heads summed)'}", fontsize=10)
            ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path):
    """Save a matplotlib figure as PNG beside `path`, then rename it over `path`; close it."""
    import matplotlib.pyplot as plt
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def top_components(scores, tokens, k=5):
    lines = []
    for kind in ("informative", "downstream", "upstream"):
        mlp, attn = scores[f"{kind}.mlp"], scores[f"{kind}.attn"]           # (Ta, L), (Ta, L, H)
        items = [(float(v), f"MLP {l} @ {t}:{tokens[t]!r}") for (t, l), v in zip(
            torch.cartesian_prod(*map(torch.arange, mlp.shape)).tolist(), mlp.flatten())]
        items += [(float(v), f"head {l}.{h} @ {t}:{tokens[t]!r}") for (t, l, h), v in zip(
            torch.cartesian_prod(*map(torch.arange, attn.shape)).tolist(), attn.flatten())]
        items.sort(key=lambda x: -x[0])
        lines.append(f"{kind}: " + "; ".join(f"{name} {v:+.3g}" for v, name in items[:k]))
    return lines


def exact_report(ex, lin, L, H):
    """Correlation between causal (eqs. 1-3) and linearized (eqs. 4-6) scores over all components."""
    report, lines = {}, []
    for kind in ("informative", "downstream", "upstream"):
        # linearized, summed over positions: (N, T, L) and (N, T, L, H) -> (L, H + 1) like the exact table
        l_ = torch.cat([lin[f"{kind}.attn"], lin[f"{kind}.mlp"][..., None]], dim=-1).sum(1).mean(0)
        e_ = ex[kind]
        gap = (e_ - l_).abs().flatten()
        worst = gap.argsort(descending=True)[:3].tolist()
        name = lambda i: f"{'MLP' if i % (H + 1) == H else 'head'} {i // (H + 1)}" + \
            ("" if i % (H + 1) == H else f".{i % (H + 1)}")
        report[kind] = {"pearson_r": pearson(e_, l_), "pearson_r_mlp": pearson(e_[:, H], l_[:, H]),
                        "pearson_r_heads": pearson(e_[:, :H], l_[:, :H]),
                        "largest_disagreements": [{"component": name(i), "exact": float(e_.flatten()[i]),
                                                   "linearized": float(l_.flatten()[i])} for i in worst],
                        "exact": e_.tolist(), "linearized": l_.tolist()}
        lines.append(f"{kind}: r = {report[kind]['pearson_r']:.3f} (MLPs {report[kind]['pearson_r_mlp']:.3f}, "
                     f"heads {report[kind]['pearson_r_heads']:.3f}); largest gaps: " +
                     ", ".join(f"{d['component']} exact {d['exact']:+.3g} vs lin {d['linearized']:+.3g}"
                               for d in report[kind]["largest_disagreements"]))
    return report, lines


# --- command line -------------------------------------------------------------------------------------

def check_pair(model_a, model_b, tok_a, tok_b, a, b):
    if model_a.config != model_b.config:
        raise ValueError(f"{a} and {b} have different architectures "
                         f"({', '.join(config_diff(model_a.config, model_b.config))}): "
                         "ckpt_b must be a finetune of ckpt_a")
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError(f"{a} and {b} have different tokenizers: ckpt_b must be a finetune of ckpt_a")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_a", help="weights W before finetuning: a directory, 'smollm2-135m', or a hub id")
    ap.add_argument("ckpt_b", help="weights W' after finetuning (e.g. runs/first_hop from train.py)")
    ap.add_argument("--dataset", help="dataset name or JSON file (default: the one in ckpt_b/metrics.json)")
    ap.add_argument("--seed", type=int, help="dataset seed (default: ckpt_b/metrics.json's, else 0)")
    ap.add_argument("--split", default="implications", help="dataset split to score (default: implications)")
    ap.add_argument("--out", help="output directory (default: runs/<ckpt_b name>/scores)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    ap.add_argument("--exact", action="store_true", help="also compute the causal scores (eqs. 1-3) by intervention")
    ap.add_argument("--exact-prompts", type=int, default=4,
                    help="number of prompts for --exact (each component costs ~4 partial forwards per prompt batch)")
    args = ap.parse_args()
    try:
        t0 = time.time()
        meta_file = resolve(args.ckpt_b) / "metrics.json"       # also: a clear error if ckpt_b is missing
        meta = json.loads(meta_file.read_text()).get("args", {}) if meta_file.exists() else {}
        dataset = args.dataset or meta.get("dataset")
        if dataset is None:
            raise ValueError(f"no --dataset given and {meta_file} does not name one")
        seed = args.seed if args.seed is not None else meta.get("seed", 0)
        out = Path(args.out or Path("runs") / Path(str(args.ckpt_b)).name / "scores")
        print(f"loading {args.ckpt_a} (W) and {args.ckpt_b} (W')", flush=True)
        model_a = from_pretrained(args.ckpt_a, device=args.device).requires_grad_(False)
        model_b = from_pretrained(args.ckpt_b, device=args.device).requires_grad_(False)
        tok = load_tokenizer(args.ckpt_a)
        check_pair(model_a, model_b, tok, load_tokenizer(args.ckpt_b), args.ckpt_a, args.ckpt_b)
        splits = data.load_dataset(dataset, seed=seed)
        if args.split not in splits:
            raise ValueError(f"dataset {dataset!r} has no split {args.split!r} (it has {', '.join(splits)})")
        b = make_prompts(tok, splits[args.split], args.device)
        N, T = b.ids.shape
        print(f"scoring {N} prompts of {dataset}/{args.split} ({T} positions): 3 batched passes", flush=True)
        lin = linearized(model_a, model_b, b)
        scores = {k: to_anchor(v.cpu(), b.pos, b.Ta) for k, v in lin.items()}
        tokens = [tok.decode([i]) for i in b.ids[b.anchor, :b.Ta].tolist()]        # readable labels
        settings = {"ckpt_a": str(args.ckpt_a), "ckpt_b": str(args.ckpt_b), "ckpt_a_dir": str(resolve(args.ckpt_a)),
                    "dataset": str(dataset), "seed": seed, "split": args.split, "n_prompts": N,
                    "anchor_prompt": splits[args.split][b.anchor].prompt, "anchor_tokens": tokens,
                    "reward": "logit(answer first token) - mean over candidates' first tokens",
                    "gqa": "k/v informative terms split equally among the query heads sharing the kv head"}
        from safetensors.torch import save_file
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in scores.items()} | {"anchor_ids": b.ids[b.anchor, :b.Ta].cpu()}
        save_file(tensors, str(out / "scores.safetensors.tmp"), metadata={"settings": json.dumps(settings)})
        (out / "scores.safetensors.tmp").replace(out / "scores.safetensors")
        figure(scores, tokens, out / "scores.png", f"{Path(str(args.ckpt_b)).name}: {dataset} {args.split}")
        lines = top_components(scores, tokens)
        if args.exact:
            k = min(args.exact_prompts, N)
            print(f"exact scores (eqs. 1-3) on {k} prompts, by intervention", flush=True)
            ex = exact(model_a, model_b, b, list(range(k)))
            report, ex_lines = exact_report(ex, {n: v[:k].cpu() for n, v in lin.items()},
                                            model_a.config.n_layers, model_a.config.n_heads)
            write_text_atomic(out / "exact.json", json.dumps({"settings": settings, "n_prompts": k, **report}))
            lines += ["exact vs linearized, per component summed over positions:"] + ex_lines
        (out / "summary.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"wrote {out}/scores.safetensors, scores.png, summary.txt in {time.time() - t0:.1f} s")
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
