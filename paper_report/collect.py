"""Read the report's stage outputs, for every seed, into one dict (results.json): every number is a list with one
entry per seed, None where that seed's stage failed or did not run, so that two conditions pair up by seed.

Layout under --work/seed{s}: first_hop/ and second_hop/metrics.json (train.py), scores_{hop}/scores.safetensors
(scores.py), freeze_post_{hop}.json, {hop}_{early,late}_pre/metrics.json, graft/results.json (graft.py
--experiment), daxwug_{impl_first,joint,facts_first_replay}/metrics.json, preconditions.json (the base model's
knowledge, preconditions.base_knowledge), salience.json (preconditions.salience), stage_times*.json; with --grid,
grid/ (paper_report/sweep.py) and gentle_lr{lr}_ep{epochs}/ (graft/ and the daxwug orderings again, at the grid's
gentlest cell).
"""
import json
from pathlib import Path

import torch

from paper_report import paper, sweep
from paper_report.claims import ALL_ORDERS, HOPS, LATE
from paper_report.stats import fig6_stats, midranks, pearson, spearman_pooled

T2_ROWS = tuple(paper.TABLE2)


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def final(records, phase=None):
    rs = [r for r in records or [] if phase is None or r["phase"] == phase]
    return rs[-1] if rs else None


def localization(path):
    """Fig. 3 in three numbers, from one scores.safetensors (scores averaged over prompts, on anchor positions):
    inf_centroid    layer centroid of the positive informative MLP score (0 = first layer, 1 = last)
    inf_last        its share at the last position
    down_late_last  share of the positive downstream score (MLPs and heads) at the last position in the late
                    layers (from LATE of the depth on); None when the file has no downstream scores"""
    from safetensors.torch import load_file
    t = load_file(str(path))
    p = t["informative.mlp"].clamp(min=0)                                    # (Ta, L)
    total = float(p.sum()) or 1.0
    L = p.shape[1]
    out = {"inf_centroid": float((p.sum(0) * torch.arange(L)).sum()) / total / max(L - 1, 1),
           "inf_last": float(p[-1].sum()) / total, "down_late_last": None}
    if "downstream.mlp" in t:
        q = t["downstream.mlp"].clamp(min=0)                                 # (Ta, L)
        if "downstream.attn" in t:
            q = q + t["downstream.attn"].clamp(min=0).sum(-1)                # (Ta, L, H) -> (Ta, L)
        out["down_late_last"] = float(q[-1, int(LATE * L):].sum()) / (float(q.sum()) or 1.0)
    return out


FIG6_UNITS = {2: "per position x layer", 3: "per position x layer x head"}


def fig6_pooled(per_seed):
    """Fig. 6 over all seeds: per comp, one permutation test over every seed's entries, shuffled within seed."""
    out = {}
    for comp in ("mlp", "heads"):
        down, inf, strata, rs = [], [], [], []
        units = None
        for s, g in enumerate(per_seed):
            if not g:
                continue
            f = g[comp]
            down += f["downstream"]
            inf += f["informative"]
            strata += [s] * len(f["downstream"])
            rs.append(f.get("r"))
            units = FIG6_UNITS.get(len(f.get("shape") or []), "per component, summed over positions (old format)")
        if not down:
            return None
        out[comp] = {**fig6_stats(down, inf, seed=0, strata=strata), "units": units, "n_seeds": len(rs),
                     "per_seed_r": rs}
    return out


def orders_and_graft(dirs):
    """Fig. 4 (every ordering, replay included), Table 3 and Fig. 6 from the per-seed directories `dirs` (each
    holding graft/ and daxwug_*/): {"fig4", "table3", "fig6", "fig6_sources", "fig6_png", "settings"}."""
    n = len(dirs)
    out = {"fig4": {o: [None] * n for o in ALL_ORDERS}, "table3": None, "fig6": None, "fig6_authors": None,
           "fig6_sources": [None] * n, "fig6_png": None, "settings": None}
    t3, graft_runs, authors_runs = {}, [None] * n, [None] * n
    for i, w in enumerate(dirs):
        g = read_json(w / "graft" / "results.json")
        if g:
            for wname, cols in g["table3"].items():
                for c, v in cols.items():
                    t3.setdefault(wname, {}).setdefault(c, [None] * n)[i] = v
            graft_runs[i] = g["fig6"]
            authors_runs[i] = g.get("fig6_authors")                          # graft.py before it had none
            out["fig6_sources"][i] = str(w / "graft" / "results.json")
            out["fig6_png"] = out["fig6_png"] or str(w / "graft" / "fig6.png")
            out["fig4"]["facts_first"][i] = g["fig4_facts_first"]
            out["settings"] = out["settings"] or g.get("settings") or {}
        for order in [o for o in ALL_ORDERS if o != "facts_first"]:   # facts_first: the graft chain above
            m = read_json(w / f"daxwug_{order}" / "metrics.json")
            out["fig4"][order][i] = m["records"] if m else None
    out["table3"] = t3 or None
    out["fig6"] = fig6_pooled(graft_runs)
    out["fig6_authors"] = fig6_pooled(authors_runs) if any(authors_runs) else None
    return out


def exact_summary(path):
    """exact.py's comparison (eqs. 1-3 against 4-6) without its per-component tables: per ablation and kind, Pearson
    r over all components, MLPs and heads; the sum identity; None if it has not run."""
    ex = read_json(path)
    if not ex:
        return None
    keep = ("pearson_r", "pearson_r_mlp", "pearson_r_heads")
    return {"settings": ex["settings"], "sum_identity": ex["sum_identity"],
            **{a: {kind: {k: v[k] for k in keep} for kind, v in ex[a].items()}
               for a in ("full_ablation", "scaled_ablation")}}


def salience_pooled(per_seed):
    """Per hop: Spearman's rho of the base model's known-hop margin (and rank) against the finetune's implication
    rank, ranked within seed and pooled over seeds with a within-seed permutation test (stats.spearman_pooled)."""
    out = {}
    for hop in HOPS:
        rows = [(s, x) for s, sal in enumerate(per_seed) if sal and hop in sal for x in
                zip(sal[hop]["base_margin"], sal[hop]["base_rank"], sal[hop]["impl_rank"])]
        if not rows:
            continue
        strata = [s for s, _ in rows]
        margin, brank, impl = ([x[k] for _, x in rows] for k in range(3))
        # a constant variable (e.g. the base model ranks every known hop at 0) has no correlation: rho None
        rho_m, p_m, n = spearman_pooled(margin, impl, strata)
        rho_r, p_r, _ = spearman_pooled(brank, impl, strata)
        out[hop] = {"rho_margin": rho_m, "p_margin": p_m, "rho_rank": rho_r, "p_rank": p_r, "n": n,
                    "n_seeds": len(set(strata)),
                    "per_seed_rho_margin": [pearson(midranks(sal[hop]["base_margin"]),
                                                    midranks(sal[hop]["impl_rank"]))
                                            if sal and hop in sal else None for sal in per_seed]}
    return out or None


def collect(model, seeds, work):
    """Everything REPORT.md needs, from the stage outputs under `work`."""
    work = Path(work)
    n = len(seeds)
    res = {"model": str(model), "seeds": list(seeds), "work": str(work), "settings": {}, "stage_times": {},
           "fig2": {h: [None] * n for h in HOPS}, "fig3": {h: {"png": None, "stats": [None] * n} for h in HOPS},
           "table2": {row: {h: {"fact": [None] * n, "impl": [None] * n} for h in HOPS} for row in T2_ROWS},
           "preconditions": [None] * n, "threads": [None] * n}     # threads: torch's, per seed

    def add(row, hop, i, rec):
        if rec is not None:
            res["table2"][row][hop]["fact"][i] = rec["fact_mean_rank"]
            res["table2"][row][hop]["impl"][i] = rec["impl_mean_rank"]

    salience = [None] * n
    for i, seed in enumerate(seeds):
        w = work / f"seed{seed}"
        times = [w / "stage_times.json", *sorted(w.glob("stage_times_*.json")), w / "grid" / "stage_times.json"]
        res["stage_times"][str(seed)] = {k: v for f in times for k, v in (read_json(f) or {}).items()}
        res["preconditions"][i] = read_json(w / "preconditions.json")
        salience[i] = read_json(w / "salience.json")
        for hop in HOPS:
            m = read_json(w / hop / "metrics.json")
            if m:
                res["fig2"][hop][i] = m["records"]
                add("None", hop, i, final(m["records"]))
                add("All", hop, i, m["records"][0])                          # epoch 0: the base model's ranks
                if hop == HOPS[0]:                                           # a seed's stages share one process
                    res["threads"][i] = m.get("torch_threads")
                if not res["settings"]:
                    a = m["args"]
                    res["settings"] = {k: a.get(k) for k in ("lr", "epochs", "batch_size", "schedule", "dtype",
                                                             "train_all", "threads")}
                    res["settings"].update(n_params=m.get("n_params"), n_trainable=m.get("n_trainable"),
                                           base_model=m.get("base_model"))
            post = read_json(w / f"freeze_post_{hop}.json")
            for which in ("early", "late"):
                if post:
                    add(which.capitalize(), hop, i, post[which])
                    res["settings"][f"{which}_layers"] = post[which]["layers"]
                pre = read_json(w / f"{hop}_{which}_pre" / "metrics.json")
                add(f"{which.capitalize()} (pre)", hop, i, final(pre["records"]) if pre else None)
            sc = w / f"scores_{hop}" / "scores.safetensors"
            if sc.exists():
                res["fig3"][hop]["stats"][i] = localization(sc)
                res["fig3"][hop]["png"] = res["fig3"][hop]["png"] or str(sc.with_name("scores.png"))
    og = orders_and_graft([work / f"seed{s}" for s in seeds])
    del og["settings"]
    res.update(og)
    res["salience"] = salience_pooled(salience)
    res["exact"] = exact_summary(work / f"seed{seeds[0]}" / "exact_first_hop" / "exact.json") if seeds else None
    res["grid"] = sweep.collect_grid(work, seeds)
    cell = sweep.gentlest(res["grid"], res["table2"]["All"]["first_hop"]["impl"])
    gentle = orders_and_graft([sweep.gentle_dir(work / f"seed{s}", cell) for s in seeds]) if cell else None
    res["gentle"] = gentle if gentle and gentle["settings"] is not None else None
    res["graft_sweep"] = sweep.collect_graft_sweep(work / f"seed{seeds[0]}") if seeds else None
    cell = sweep.premise_cell(res["graft_sweep"])
    premise = orders_and_graft([sweep.premise_dir(work / f"seed{s}", cell) for s in seeds]) if cell else None
    res["premise"] = premise if premise and premise["settings"] is not None else None
    return res
