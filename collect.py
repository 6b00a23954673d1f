"""Read the report's stage outputs, for every seed, into one dict (results.json): every number is a list with one
entry per seed, None where that seed's stage failed or did not run, so that two conditions pair up by seed.

Layout under --work/seed{s}: first_hop/ and second_hop/metrics.json (train.py), scores_{hop}/scores.safetensors
(scores.py), freeze_post_{hop}.json, {hop}_{early,late}_pre/metrics.json, graft/results.json (graft.py
--experiment), daxwug_impl_first/ and daxwug_joint/metrics.json, preconditions.json (the base model's knowledge,
preconditions.base_knowledge) and stage_times.json.
"""
import json
from pathlib import Path

import torch

import paper
from claims import HOPS, LATE, ORDERS
from stats import fig6_stats

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


def collect(model, seeds, work):
    """Everything REPORT.md needs, from the stage outputs under `work`."""
    work = Path(work)
    n = len(seeds)
    res = {"model": str(model), "seeds": list(seeds), "work": str(work), "settings": {}, "stage_times": {},
           "fig2": {h: [None] * n for h in HOPS}, "fig3": {h: {"png": None, "stats": [None] * n} for h in HOPS},
           "table2": {row: {h: {"fact": [None] * n, "impl": [None] * n} for h in HOPS} for row in T2_ROWS},
           "fig4": {o: [None] * n for o in ORDERS}, "table3": None, "fig6": None, "fig6_png": None,
           "fig6_sources": [None] * n, "preconditions": [None] * n}
    t3, graft_runs = {}, [None] * n

    def add(row, hop, i, rec):
        if rec is not None:
            res["table2"][row][hop]["fact"][i] = rec["fact_mean_rank"]
            res["table2"][row][hop]["impl"][i] = rec["impl_mean_rank"]

    for i, seed in enumerate(seeds):
        w = work / f"seed{seed}"
        res["stage_times"][str(seed)] = read_json(w / "stage_times.json") or {}
        res["preconditions"][i] = read_json(w / "preconditions.json")
        for hop in HOPS:
            m = read_json(w / hop / "metrics.json")
            if m:
                res["fig2"][hop][i] = m["records"]
                add("None", hop, i, final(m["records"]))
                add("All", hop, i, m["records"][0])                          # epoch 0: the base model's ranks
                if not res["settings"]:
                    a = m["args"]
                    res["settings"] = {k: a.get(k) for k in ("lr", "epochs", "batch_size", "constant_lr", "dtype",
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
        g = read_json(w / "graft" / "results.json")
        if g:
            for wname, cols in g["table3"].items():
                for c, v in cols.items():
                    t3.setdefault(wname, {}).setdefault(c, [None] * n)[i] = v
            graft_runs[i] = g["fig6"]
            res["fig6_sources"][i] = str(w / "graft" / "results.json")
            res["fig6_png"] = res["fig6_png"] or str(w / "graft" / "fig6.png")
            res["fig4"]["facts_first"][i] = g["fig4_facts_first"]
        for order in ("impl_first", "joint"):
            m = read_json(w / f"daxwug_{order}" / "metrics.json")
            res["fig4"][order][i] = m["records"] if m else None
    res["table3"] = t3 or None
    res["fig6"] = fig6_pooled(graft_runs)
    return res
