"""Exact (causal) scores of eqs. 1-3 by real interventions, and how well the linearized ones (scores.py, eqs. 4-6)
approximate them.

    python exact.py ckpt_a ckpt_b [--prompts 4] [--ablation 0.05] [--out DIR]

For each component c (an MLP or a head) and prompt, with R the reward of scores.py:
  informative  R(W with c's weights at W') - R(W)                                          eq. 1
  downstream   R(W with c's output replaced by f_c(z'_c, W_c)) - R(W)                       eq. 2
  upstream     [R(W_late <- W'_late) - R(same, y_c -> y*_c)] - [R(W) - R(W, y_c -> y*_c)]   eq. 3
summed over positions and averaged over prompts. The linearized scores are first-order in the weight change and
(upstream) in the ablation y -> y*; a full mean ablation can be far from linear, so `--ablation a` also runs eq. 3
with y -> y + a (y* - y), which the linearized upstream score predicts as a times itself. The sum identity checks
eq. 4 as a whole: the informative scores of all components summed against the actual change R(W') - R(W).
"""
import json
import time
from pathlib import Path

import torch
from torch.func import functional_call

from run_setup import cli, preflight
from run_setup.progress import progress, ticking
import data
import scores
from checkpoint_io.checkpoint import load_tokenizer, resolve
from checkpoint_io.outputs import atomic_dir, check_output
from model import Taps
from scores import aligned_mean_of_others, record
from paper_report.stats import pearson, show

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


def exact(model_a, model_b, b, rows, ablation=1.0, kinds=("informative", "downstream", "upstream")):
    """Causal scores (eqs. 1-3) of every component, summed over positions, averaged over prompts `rows`; only
    the `kinds` asked for. `ablation` scales the mean ablation of eq. 3: y -> y + ablation (y* - y) (1.0: the full
    ablation).
    Each intervention starts from the cached residual stream at its layer, so it only reruns later layers;
    the H head patches of one layer run together, as H copies of the prompts in one batch."""
    cfg = model_a.config
    H, E, L = cfg.n_heads, cfg.head_dim, cfg.n_layers
    n = len(rows)
    with ticking("exact scores: forward and backward at W and W'"):
        ta = record(model_a, b)                                    # W: residual streams, z, mlp_out
        tb = record(model_b, b)                                    # W': component inputs for pass 3
    s = b.subset(rows)
    rope, mask = model_a.prepare(s.ids, s.mask)
    get = lambda t, name: t[name].detach()[rows]
    A, B = list(model_a.layers), list(model_b.layers)

    def R(first, start, late, reps=1):
        """Mean reward of each of `reps` copies of the prompts, (reps,): `first` maps the residual stream at
        layer `start` to the stream after it; later layers and the final norm come from `late` (W or W')."""
        h = first(get(ta, f"layers.{start}.resid_pre").repeat(reps, 1, 1))       # (reps * n, T, D)
        for blk in late.layers[start + 1:]:
            h = blk(h, rope, mask.repeat(reps, 1))
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

    out = {k: torch.zeros(L, H + 1) for k in kinds}                  # column H = MLP
    with torch.no_grad():
        R0 = R(layer(A[0]), 0, model_a)
        for l in progress(range(L), f"exact scores ({', '.join(kinds)}, ablation {ablation:g})", unit="layer"):
            p = f"layers.{l}."
            z = get(ta, p + "z")                                   # (n, T, H*E)
            zstar = z + ablation * (aligned_mean_of_others(ta[p + "z"].detach(), b.pos, b.Ta)[rows] - z)
            y = get(ta, p + "mlp_out")
            ystar = y + ablation * (aligned_mean_of_others(ta[p + "mlp_out"].detach(), b.pos, b.Ta)[rows] - y)
            tc = Taps()                                            # pass 3: f_c(z'_c, W_c)
            A[l].attn_sublayer(tb[p + "resid_pre"].detach()[rows], rope, mask, tc)
            A[l].mlp_sublayer(tb[p + "resid_mid"].detach()[rows], tc)

            def each_head(zsrc):                                   # copy h of z has head h's slice from zsrc
                zz = z.repeat(H, 1, 1).view(H, n, -1, H * E)
                for h in range(H):
                    zz[h, ..., h * E:(h + 1) * E] = zsrc[..., h * E:(h + 1) * E]
                return {p + "z": zz.view(H * n, -1, H * E)}

            # heads (columns 0..H-1)
            if "informative" in kinds:
                out["informative"][l, :H] = torch.cat([R(layer(A[l], params=head_params(A[l], B[l], h, cfg)), l,
                                                         model_a) for h in range(H)]) - R0      # eq. 1
            if "downstream" in kinds:
                out["downstream"][l, :H] = R(layer(A[l], patch=each_head(tc[p + "z"])), l, model_a, H) - R0   # eq. 2
            ablate = each_head(zstar)
            out["upstream"][l, :H] = (R(layer(A[l], mlp_blk=B[l]), l, model_b)                 # eq. 3
                                      - R(layer(A[l], patch=ablate, mlp_blk=B[l]), l, model_b, H)) \
                - (R0 - R(layer(A[l], patch=ablate), l, model_a, H))
            # the MLP (column H)
            pa, pb = dict(A[l].named_parameters()), dict(B[l].named_parameters())
            mlp_new = {k: (pb[k] if k.startswith("mlp.") else v) for k, v in pa.items()}
            if "informative" in kinds:
                out["informative"][l, H] = R(layer(A[l], params=mlp_new), l, model_a)[0] - R0      # eq. 1
            if "downstream" in kinds:
                out["downstream"][l, H] = R(layer(A[l], patch={p + "mlp_out": tc[p + "mlp_out"]}), l,
                                            model_a)[0] - R0                                    # eq. 2
            ablate = {p + "mlp_out": ystar}
            out["upstream"][l, H] = (R(layer(A[l]), l, model_b) - R(layer(A[l], patch=ablate), l, model_b))[0] \
                - (R0 - R(layer(A[l], patch=ablate), l, model_a))[0]                            # eq. 3
    return out


def compare(ex, lin, L, H, kinds=("informative", "downstream", "upstream", "upstream_authors")):
    """Correlation between causal (eqs. 1-3) and linearized (eqs. 4-6) scores over all components; the authors'
    upstream variant is compared with the same exact eq. 3."""
    report, lines = {}, []
    for kind in kinds:
        # linearized, summed over positions: (N, T, L) and (N, T, L, H) -> (L, H + 1) like the exact table
        l_ = torch.cat([lin[f"{kind}.attn"], lin[f"{kind}.mlp"][..., None]], dim=-1).sum(1).mean(0)
        e_ = ex["upstream" if kind == "upstream_authors" else kind]
        gap = (e_ - l_).abs().flatten()
        worst = gap.argsort(descending=True)[:3].tolist()
        name = lambda i: f"{'MLP' if i % (H + 1) == H else 'head'} {i // (H + 1)}" + \
            ("" if i % (H + 1) == H else f".{i % (H + 1)}")
        e_, l_ = e_.cpu(), l_.cpu()                                  # stats.pearson reads them as numpy
        report[kind] = {"pearson_r": pearson(e_, l_), "pearson_r_mlp": pearson(e_[:, H], l_[:, H]),
                        "pearson_r_heads": pearson(e_[:, :H], l_[:, :H]),
                        "largest_disagreements": [{"component": name(i), "exact": float(e_.flatten()[i]),
                                                   "linearized": float(l_.flatten()[i])} for i in worst],
                        "exact": e_.tolist(), "linearized": l_.tolist()}
        lines.append(f"{kind}: r = {show(report[kind]['pearson_r'])} (MLPs {show(report[kind]['pearson_r_mlp'])}, "
                     f"heads {show(report[kind]['pearson_r_heads'])}); largest gaps: " +
                     ", ".join(f"{d['component']} exact {d['exact']:+.3g} vs lin {d['linearized']:+.3g}"
                               for d in report[kind]["largest_disagreements"]))
    return report, lines

def sum_identity(model_a, model_b, b, rows, lin):
    """Eq. 4 summed over every component and position, against the actual change of R, per prompt (rows)."""
    with torch.no_grad():
        actual = scores.rewards(model_b, b.subset(rows)) - scores.rewards(model_a, b.subset(rows))
    predicted = (lin["informative.mlp"][rows].sum((1, 2)) + lin["informative.attn"][rows].sum((1, 2, 3)))
    return {"actual_dR": actual.tolist(), "informative_sum": predicted.tolist(),
            "pearson_r": pearson(actual.cpu(), predicted.cpu())}


def run(ckpt_a, ckpt_b, out, n_prompts=4, ablation=0.05, dataset=None, seed=None, device="cpu", overwrite=False,
        log=print):
    t0 = time.time()
    dataset, seed = preflight.pair(ckpt_a, ckpt_b, dataset, seed)   # W, W' and the dataset: before any work
    examples = data.load_dataset(dataset, seed=seed)["implications"]
    chance = preflight.answers(load_tokenizer(ckpt_a), {"implications": examples}, log)
    check_output(out, "exact", overwrite, inputs=preflight.inputs([resolve(ckpt_a), resolve(ckpt_b)], dataset), log=log)
    model_a, model_b, tok = scores.load_pair(ckpt_a, ckpt_b, device, log)
    b = scores.make_prompts(tok, examples, next(model_a.parameters()).device)
    rows = list(range(min(n_prompts, b.ids.shape[0])))
    log(f"linearized scores (scores.py) on all {b.ids.shape[0]} prompts, for the comparison")
    lin = {k: v.cpu() for k, v in scores.linearized(model_a, model_b, b, log).items()}
    cfg = model_a.config
    log(f"exact scores (eqs. 1-3) on {len(rows)} prompts, full ablation")
    full, lines = compare(exact(model_a, model_b, b, rows, 1.0), {k: v[rows] for k, v in lin.items()},
                          cfg.n_layers, cfg.n_heads)
    log(f"exact upstream with the ablation scaled to {ablation:g}")
    scaled_up = exact(model_a, model_b, b, rows, ablation, kinds=("upstream",))["upstream"] / ablation
    scaled, scaled_lines = compare({"upstream": scaled_up}, {k: v[rows] for k, v in lin.items()},
                                   cfg.n_layers, cfg.n_heads, kinds=("upstream", "upstream_authors"))
    ident = sum_identity(model_a, model_b, b, rows, lin)
    lines = ["full ablation:"] + lines + [f"ablation scaled to {ablation:g} (exact / {ablation:g}):"] + scaled_lines
    lines.append(f"sum identity: informative summed {[round(x, 3) for x in ident['informative_sum']]} vs actual "
                 f"dR {[round(x, 3) for x in ident['actual_dR']]}")
    with atomic_dir(out, "exact", overwrite, log=log) as tmp:
        (tmp / "exact.json").write_text(json.dumps({
            "settings": {"ckpt_a": str(ckpt_a), "ckpt_b": str(ckpt_b), "dataset": str(dataset), "seed": seed,
                         "n_prompts": len(rows), "ablation_scale": ablation, "chance_mean_rank": chance},
            "full_ablation": full, "scaled_ablation": scaled, "sum_identity": ident}, indent=1) + "\n")
        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    log(f"wrote {out}: exact.json, summary.txt in {time.time() - t0:.1f} s")
    return full, scaled, ident


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("ckpt_a", help="weights W before finetuning")
    ap.add_argument("ckpt_b", help="weights W' after finetuning")
    ap.add_argument("--prompts", type=cli.positive_int, default=4,
                    help="prompts to intervene on (each costs ~4 partial forwards per component)")
    ap.add_argument("--ablation", type=cli.fraction, default=0.05,
                    help="the scaled mean ablation of the second eq. 3 run (a fraction of the way to y*)")
    ap.add_argument("--dataset", help="dataset (default: the one in ckpt_b/metrics.json)")
    ap.add_argument("--seed", type=int, help="dataset seed (default: ckpt_b/metrics.json's)")
    ap.add_argument("--out", help="output directory (default runs/<ckpt_b name>.exact)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out even if it is not ours")
    ap.add_argument("--device", type=cli.device_name, default=cli.default_device(), help="torch device")
    cli.threads_flag(ap)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out or Path("runs") / f"{Path(str(a.ckpt_b)).name}.exact")
    return cli.run(lambda: run(a.ckpt_a, a.ckpt_b, out, a.prompts, a.ablation, a.dataset, a.seed, a.device,
                               a.overwrite))


if __name__ == "__main__":
    main()
