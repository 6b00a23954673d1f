"""Informative, downstream and upstream scores of every MLP and attention head, at every position (paper Sec. 4).

    python scores.py ckpt_a ckpt_b [--dataset NAME] [--out DIR]      # exact.py: the exact scores (eqs. 1-3)

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
               g'_c = dR/dy_c with only the weights after c changed (W_late <- W'_late): for a head, its layer's
               MLP and the later layers; for an MLP, the later layers. Computed by one partial pass per layer from
               the cached W residual stream (late_gradients). "upstream_authors" is the authors' cheaper variant:
               g' from the full pass at W' (early layers changed too), which is not eq. 6.
Grouped-query attention: a key/value head is shared by G = H/K query heads; its k and v informative
terms are split equally among them (sums over heads stay exact).
Positions are aligned by template: the tokens all prompts share at the start, the slot (right-aligned),
the tokens all prompts share at the end. Scores are averaged over prompts on one anchor prompt's positions.

exact.py computes the causal scores of eqs. 1-3 by real interventions and compares them with these.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from run_setup import cli
import data
from run_setup import dist, preflight
from run_setup.progress import progress, ticking
from checkpoint_io.checkpoint import UserError, check_same_base, load_tokenizer, resolve
from run_setup.optim import local as optim_local
from checkpoint_io.outputs import atomic_dir, check_output, save_figure
from fused_kernels.grad_delta import grad_delta
from model import Taps, upcast

MLP_MAPS = ("gate_proj", "up_proj", "down_proj")
KINDS = ("informative", "downstream", "upstream")               # the three scores; linearized computes any of them


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
    position, y* = y (no ablation). Every buffer lives on y's device; padding goes to a spare slot Ta."""
    N, T = pos.shape
    idx = torch.where(pos >= 0, pos, Ta).to(y.device).reshape(-1)  # (N*T,) padding -> slot Ta
    flat = y.reshape(N * T, -1)
    total = torch.zeros(Ta + 1, flat.shape[-1], dtype=y.dtype, device=y.device).index_add_(0, idx, flat)
    count = torch.zeros(Ta + 1, dtype=y.dtype, device=y.device).index_add_(0, idx, torch.ones_like(flat[:, 0]))
    dist.all_reduce_sum(total), dist.all_reduce_sum(count)        # torchrun: the other prompts of every rank
    others = (count[idx] - 1)[:, None]                             # (N*T, 1)
    ystar = torch.where(others > 0, (total[idx] - flat) / others.clamp(min=1), flat)
    return ystar.view_as(y)


def to_anchor(s, pos, Ta):
    """Per-prompt scores (N, T, ...) -> mean over prompts on the anchor's positions (Ta, ...)."""
    N, T = pos.shape
    idx = torch.where(pos >= 0, pos, Ta).to(s.device).reshape(-1)  # padding -> spare slot Ta, dropped
    out = torch.zeros((Ta + 1,) + s.shape[2:], dtype=s.dtype, device=s.device)
    return out.index_add_(0, idx, s.reshape((N * T,) + s.shape[2:]))[:Ta] / N


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
    return Prompts(to(ids), to(mask), to(correct), to(cands), to(pos), lengths[anchor], anchor)


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


def late_gradients(model_a, model_b, b, ta):
    """g' of eq. 6: dR/dy_c with only the weights after component c changed (W_late <- W'_late), for every
    layer l, from the W residual stream cached in `ta` (pass 1):
        heads of layer l: attention at W (its output attn_out the leaf), layer l's MLP and later layers at W'
        MLP of layer l:   MLP at W (its output mlp_out the leaf), later layers at W'
    as in the exact eq. 3 (exact.py). Both entry points of a layer run as one batch of 2N through the later
    layers: one partial pass per layer. Returns {l: dR/d attn_out (N, T, D)}, {l: dR/d mlp_out (N, T, D)}."""
    L, N = model_a.config.n_layers, b.ids.shape[0]
    rope, mask = model_a.prepare(b.ids, b.mask)
    rope2, mask2 = model_b.prepare(b.ids.repeat(2, 1), b.mask.repeat(2, 1))
    last = b.mask.repeat(2, 1).sum(1) - 1                          # (2N,) right padding
    A, B = model_a.layers, model_b.layers
    g_attn, g_mlp = {}, {}
    bar = progress(desc="eq. 6's partial passes", total=L * (L + 1) // 2, unit="block")   # layer l's runs L - l
    for l in dist.layer_by_layer(model_a, model_b):               # torchrun: layer l's weights whole, then freed
        p = f"layers.{l}."
        t_head, t_mlp = Taps(grads=True), Taps(grads=True)         # each records its own leaf y_c
        h0 = ta[p + "resid_pre"].detach()                          # (N, T, D) at W
        mid = h0 + A[l].attn_sublayer(h0, rope, mask, t_head)      # the heads at W ...
        head_path = mid + B[l].mlp_sublayer(mid)                   # ... their layer's MLP at W'
        mid_w = ta[p + "resid_mid"].detach()
        mlp_path = mid_w + A[l].mlp_sublayer(mid_w, t_mlp)         # the MLP at W
        h = torch.cat([head_path, mlp_path])                       # (2N, T, D)
        for blk in B[l + 1:]:                                      # the later layers at W'
            h = blk(h, rope2, mask2)
        logits = model_b.logits(model_b.model.norm(h)[torch.arange(2 * N, device=h.device), last])
        data.reward(logits, b.correct.repeat(2), b.cands).sum().backward()
        g_attn[l], g_mlp[l] = t_head[p + "attn_out"].grad, t_mlp[p + "mlp_out"].grad
        bar.update(L - l)
    bar.close()
    return g_attn, g_mlp


def linearized(model_a, model_b, b, log=lambda *_: None, kinds=KINDS):
    """Per-prompt, per-position scores of `kinds` (some of KINDS; bit for bit the same whatever else is computed):
    (N, T, L) for MLPs, (N, T, L, H) for heads, keyed {informative, downstream, upstream, upstream_authors}.{mlp, attn}
    and informative_down.mlp (informative brings informative_down, upstream upstream_authors). Without upstream, no
    eq. 6 partial passes (most of the time) and no backward at W'; without downstream, no pass 3. `log`: per pass."""
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be some of {KINDS}, not {kinds!r}")
    upstream = "upstream" in kinds
    cfg = model_a.config
    H, K, E, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    G = H // K
    N, T = b.ids.shape
    rope, mask = model_a.prepare(b.ids, b.mask)
    t0 = time.time()
    with ticking("pass 1/3, forward and backward at W"):
        ta = record(model_a, b)                                    # pass 1, at W
    t1 = time.time() - t0
    log(f"  pass 1/3 (forward and backward at W) done, {t1:.0f} s")
    if upstream:
        with ticking("pass 2/3, forward and backward at W'", expected_s=t1):      # pass 1's work again
            tb = record(model_b, b)                                # pass 2, at W'
        log(f"  pass 2/3 (forward and backward at W') done, {time.time() - t0:.0f} s")
        g_attn, g_mlp = late_gradients(model_a, model_b, b, ta)  # eq. 6's g', W_late <- W'_late
        log(f"  eq. 6's partial passes ({L} layers) done, {time.time() - t0:.0f} s; pass 3/3, the scores per layer")
    elif "downstream" in kinds:                                    # pass 2 as eq. 5 needs it: W' activations only
        with torch.no_grad():
            rewards(model_b, b, tb := Taps())
    out = {}
    with torch.no_grad():
        for l in progress(dist.layer_by_layer(model_a, model_b), "pass 3/3, the scores", L, "layer"):   # torchrun:
            p = f"layers.{l}."                                     # layer l's weights whole, then freed
            a = lambda name: upcast(ta[p + name].detach())          # fp32 at least: bf16 passes' activations
            grad = lambda t, name: upcast(t[p + name].grad)
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

            block, got = model_a.layers[l], {}
            # a head's write is W_o[:, h] z_h, so g . W_o[:, h] dz_h = (dR/dz)_h . dz_h: the gradient at z
            per_head = lambda u, v: (u * v).view(N, T, H, E).sum(-1)
            if "informative" in kinds:
                # heads: q rows and o columns per head; k, v rows per kv head, split over its G heads
                attn = "self_attn."
                inf_h = informative_map(grad(ta, "q"), a("attn_in"), attn + "q_proj", H, "out")
                kv = informative_map(grad(ta, "k"), a("attn_in"), attn + "k_proj", K, "out") \
                    + informative_map(grad(ta, "v"), a("attn_in"), attn + "v_proj", K, "out")
                inf_h = inf_h + kv.repeat_interleave(G, dim=-1) / G
                inf_h = inf_h + informative_map(grad(ta, "attn_out"), a("z"), attn + "o_proj", H, "in")
                # MLP: all three maps (the reference implementation drops up_proj)
                inf_m = sum(informative_map(grad(ta, m), a(x), "mlp." + m + "_proj", 1, "out")[..., 0]
                            for m, x in (("gate", "mlp_in"), ("up", "mlp_in")))
                inf_down = informative_map(grad(ta, "mlp_out"), a("mlp_act"), "mlp.down_proj", 1, "out")[..., 0]
                got |= {"informative.mlp": inf_m + inf_down, "informative.attn": inf_h,
                        "informative_down.mlp": inf_down}          # informative_down: the authors' MLP score
            if "downstream" in kinds:
                # pass 3: the components at W on their W' inputs (residual stream from the W' run)
                tc = Taps()
                block.attn_sublayer(tb[p + "resid_pre"].detach(), rope, mask, tc)
                block.mlp_sublayer(tb[p + "resid_mid"].detach(), tc)
                gz = grad(ta, "z")                                 # (N, T, H*E) = g_attn_out W_o
                got["downstream.attn"] = per_head(gz, upcast(tc[p + "z"]) - a("z"))              # eq. 5/8
                got["downstream.mlp"] = (grad(ta, "mlp_out") * (upcast(tc[p + "mlp_out"]) - a("mlp_out"))).sum(-1)
            if upstream:
                # upstream: (g' - g) . (y - y*), with the head's write through W_o at W                 eq. 6/9
                dz = a("z") - aligned_mean_of_others(a("z"), b.pos, b.Ta)
                dy = a("mlp_out") - aligned_mean_of_others(a("mlp_out"), b.pos, b.Ta)
                Wo = block.self_attn.o_proj.weight
                got["upstream.attn"] = per_head((upcast(g_attn[l]) - grad(ta, "attn_out")) @ Wo, dz)  # W'_late
                got["upstream.mlp"] = ((upcast(g_mlp[l]) - grad(ta, "mlp_out")) * dy).sum(-1)
                got["upstream_authors.attn"] = per_head((grad(tb, "attn_out") - grad(ta, "attn_out")) @ Wo, dz)
                got["upstream_authors.mlp"] = ((grad(tb, "mlp_out") - grad(ta, "mlp_out")) * dy).sum(-1)  # all W'
            for key, v in got.items():
                out.setdefault(key, []).append(v.float())
    return {k: torch.stack(v, dim=2) for k, v in out.items()}     # (N, T, L) or (N, T, L, H)


# --- outputs: tensors, figure (paper Fig. 3), summary -----------------------------------------------

def figure(scores, tokens, title):
    """Rows downstream / informative / upstream (eq. 6 as defined), those `scores` has; columns MLPs and attention
    (heads summed); layer x position. One colour scale a row (a score kind), symmetric, so MLPs and heads compare
    within a kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [k for k in ("downstream", "informative", "upstream") if f"{k}.mlp" in scores]
    fig, axes = plt.subplots(len(rows), 2, figsize=(3 + 0.5 * len(tokens) * 2, 11 * len(rows) / 3), squeeze=False,
                             layout="constrained")
    for r, kind in enumerate(rows):
        vs = [(scores[f"{kind}.attn"].sum(-1) if comp == "attn" else scores[f"{kind}.mlp"]).T.numpy()   # (L, Ta)
              for comp in ("mlp", "attn")]
        m = max(float(abs(v).max()) for v in vs) or 1.0           # symmetric limits: nothing saturates
        for c, (comp, v) in enumerate(zip(("MLP", "attention (heads summed)"), vs)):
            ax = axes[r, c]
            im = ax.imshow(v, cmap="RdBu_r", vmin=-m, vmax=m, aspect="auto", origin="lower", interpolation="nearest")
            ax.set_title(f"{kind}: {comp}", fontsize=10)
            ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
            ax.set_ylabel("layer")
        # every score is a first-order change of the reward R (a logit difference), summed over the prompt's maps
        fig.colorbar(im, ax=axes[r, :], fraction=0.03, label=f"{kind} score\n(change of R, logits)")
    fig.suptitle(f"{title}\ncolour scale shared within a row; the rows' scales differ", fontsize=10)
    return fig


def top_components(scores, tokens, k=5):
    lines = []
    for kind in [k for k in KINDS if f"{k}.mlp" in scores]:
        mlp, attn = scores[f"{kind}.mlp"], scores[f"{kind}.attn"]           # (Ta, L), (Ta, L, H)
        items = [(float(v), f"MLP {l} @ {t}:{tokens[t]!r}") for (t, l), v in zip(
            torch.cartesian_prod(*map(torch.arange, mlp.shape)).tolist(), mlp.flatten())]
        items += [(float(v), f"head {l}.{h} @ {t}:{tokens[t]!r}") for (t, l, h), v in zip(
            torch.cartesian_prod(*map(torch.arange, attn.shape)).tolist(), attn.flatten())]
        items.sort(key=lambda x: -x[0])
        lines.append(f"{kind}: " + "; ".join(f"{name} {v:+.3g}" for v, name in items[:k]))
    return lines


# --- one run: two checkpoints, one dataset split, one output directory ----------------------------------

def load_pair(ckpt_a, ckpt_b, device, log=print):
    """W and W' as frozen fp32 models, their tokenizer, after checking they share one base."""
    check_same_base([resolve(ckpt_a), resolve(ckpt_b)])
    log(f"loading {ckpt_a} (W) and {ckpt_b} (W')" + (f", each sharded over {dist.world_size()} processes"
                                                     if dist.world_size() > 1 else ""))
    model_a = dist.load(ckpt_a, device).requires_grad_(False)      # torchrun: each rank 1/N of each
    model_b = dist.load(ckpt_b, device).requires_grad_(False)
    return model_a, model_b, load_tokenizer(ckpt_a)


def score(model_a, model_b, tok, examples, log=print, kinds=KINDS):
    """The linearized scores of `kinds` (linearized), averaged over prompts on the anchor's positions:
    ({key: (Ta, L[, H])}, tokens, prompts).
    Under torchrun each rank runs the three batched passes on its share of the prompts (aligned on all of them;
    y* of eq. 6 sums over every rank's prompts); the per-prompt sums are added over the ranks."""
    b = make_prompts(tok, examples, next(model_a.parameters()).device)
    N, T = b.ids.shape
    n_ranks = dist.world_size()
    if N < n_ranks:
        raise UserError(f"{N} prompts for {n_ranks} processes: launch at most {N} (torchrun --nproc_per_node {N})")
    mine = b.subset(torch.arange(N, device=b.ids.device).chunk(n_ranks)[dist.rank()]) if n_ranks > 1 else b
    log(f"scoring {N} prompts ({T} positions): 3 batched passes" + (" and one partial pass per layer (eq. 6)"
        if "upstream" in kinds else "") + (f", {n_ranks} processes" if n_ranks > 1 else ""))
    lin = linearized(model_a, model_b, mine, log, kinds)
    tokens = [tok.decode([i]) for i in b.ids[b.anchor, :b.Ta].tolist()]        # readable labels
    n_mine = mine.ids.shape[0]
    if n_ranks == 1:
        return {k: to_anchor(v, b.pos, b.Ta).cpu() for k, v in lin.items()}, tokens, b
    # to_anchor's mean over this rank's prompts, back to a sum, added over the ranks, over all N prompts
    return {k: (dist.all_reduce_sum(to_anchor(v, mine.pos, b.Ta) * n_mine) / N).cpu() for k, v in lin.items()}, \
        tokens, b


def write(out, scores_, tokens, settings, title, overwrite=False, log=print):
    """scores.safetensors, scores.png, summary.txt and settings.json as one directory replacing `out` whole."""
    lines = top_components(scores_, tokens)
    with atomic_dir(out, "scores", overwrite, log=log) as tmp:
        tensors = {k: v.contiguous() for k, v in scores_.items()}
        save_file(tensors, str(tmp / "scores.safetensors"), metadata={"settings": json.dumps(settings)})
        save_figure(figure(scores_, tokens, title), tmp / "scores.png")
        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
        (tmp / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    return lines


def run(ckpt_a, ckpt_b, out, dataset=None, seed=None, split="implications", device="cpu", overwrite=False,
        log=print, revision=None, kinds=KINDS):
    """What `python scores.py` does, as a function (report.py calls it). `revision`: ckpt_a's, a hub id's; `kinds`:
    the scores to compute (linearized)."""
    t0 = time.time()
    name_a = ckpt_a
    if revision is not None:                                      # that snapshot's directory, for every use below
        ckpt_a = resolve(ckpt_a, revision)
    dataset, seed = preflight.pair(ckpt_a, ckpt_b, dataset, seed)   # W, W' and the dataset: before any work
    splits = data.load_dataset(dataset, seed=seed)
    if split not in splits:
        raise UserError(f"dataset {dataset!r} has no split {split!r} (it has {', '.join(splits)})")
    if dist.launched() > 1:                                       # torchrun: a share of the prompts per rank
        device = dist.init(device)
        log = dist.main_log(log)
    chance = preflight.answers(load_tokenizer(ckpt_a), {split: splits[split]}, log)   # before the models load
    # before the passes; rank 0 alone, as it alone writes (a leftover of a killed run is cleaned once)
    dist.on_main(check_output, out, "scores", overwrite, inputs=preflight.inputs([resolve(ckpt_a), resolve(ckpt_b)],
                                                                                   dataset), log=log)
    model_a, model_b, tok = load_pair(ckpt_a, ckpt_b, device, log)
    sc, tokens, b = score(model_a, model_b, tok, splits[split], log, kinds)
    if not dist.is_main():
        return sc
    settings = {"ckpt_a": str(name_a), "revision": revision, "ckpt_b": str(ckpt_b),
                "ckpt_a_dir": str(resolve(ckpt_a)),
                "dataset": str(dataset), "seed": seed, "split": split, "n_prompts": b.ids.shape[0],
                "chance_mean_rank": chance[split], "kinds": list(kinds),
                "anchor_prompt": splits[split][b.anchor].prompt, "anchor_tokens": tokens,
                "reward": "logit(answer first token) - mean over candidates' first tokens",
                "upstream": "eq. 6 as defined (W_late <- W'_late); upstream_authors: g' from the full pass at W'",
                "gqa": "k/v informative terms split equally among the query heads sharing the kv head",
                "world_size": dist.world_size(),
                # under torchrun each rank holds its shards of W and W' (dist.load): rank 0's share of the weights
                "params_this_rank": sum(optim_local(p).numel() for p in model_a.parameters()),
                "n_params": sum(p.numel() for p in model_a.parameters())}
    lines = write(out, sc, tokens, settings, f"{Path(str(ckpt_b)).name}: {dataset} {split}", overwrite, log)
    log("\n".join(lines))
    log(f"wrote {out}: scores.safetensors, scores.png, summary.txt, settings.json in {time.time() - t0:.1f} s")
    return sc


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("ckpt_a", help="weights W before finetuning: a directory, 'smollm2-135m', or a hub id")
    ap.add_argument("ckpt_b", help="weights W' after finetuning (e.g. runs/first_hop from train.py)")
    cli.revision_flag(ap, "ckpt_a")
    ap.add_argument("--dataset", help="dataset name or JSON file (default: the one in ckpt_b/metrics.json)")
    ap.add_argument("--seed", type=int, help="dataset seed (default: ckpt_b/metrics.json's, else 0)")
    ap.add_argument("--split", default="implications", help="dataset split to score")
    ap.add_argument("--out", help="output directory (default: runs/<ckpt_b name>.scores, beside the checkpoint, "
                                  "never inside it)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out even if it is not a scores directory of ours (by default an error)")
    ap.add_argument("--device", type=cli.device_name, default=cli.default_device(), help="torch device")
    ap.add_argument("--no-upstream", action="store_true", help="informative and downstream scores only: no eq. 6 "
                    "partial passes (one per layer: most of the time) and no backward at W'")
    cli.threads_flag(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or Path("runs") / f"{Path(str(args.ckpt_b)).name}.scores")
    kinds = tuple(k for k in KINDS if not (args.no_upstream and k == "upstream"))
    try:
        return cli.run(lambda: run(args.ckpt_a, args.ckpt_b, out, args.dataset, args.seed, args.split, args.device,
                                   args.overwrite, revision=args.revision, kinds=kinds))
    finally:
        dist.close()


if __name__ == "__main__":
    main()
