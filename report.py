"""Every table and figure of the paper for one model, side by side with the paper's OLMo-7B, in REPORT.md.

    python report.py [--model smollm2-135m] [--seeds N] [--out results/<model>] [--work runs/report/<model>]

Stages, per seed s, each a directory or file under --work/seed{s}, run in this process from one loaded base model
(train.run, scores.run, graft.experiment), and skipped when their output already exists (a failed stage is
recorded and the rest go on):
    first_hop, second_hop          train.run: Fig. 2; Table 2 None (last epoch) and All (epoch 0: the base)
    scores_first_hop, _second_hop  scores.run on those finetunes: Fig. 3
    freeze_post_{hop}.json         Table 2 Early / Late: the plain finetune with its early / late layers reset to
                                   the base, which is what `train.py --freeze X --freeze-when post` computes
                                   (it trains the same model with the same seed first): no second training
    {hop}_{early,late}_pre         --freeze X --freeze-when pre: Table 2 Early (pre) / Late (pre)
    graft                          graft.experiment: Table 3, Fig. 6, and Fig. 4's facts-first ordering
    daxwug_impl_first              Fig. 4: graft's W_ImplF, then train facts, then test facts (graft.train_stage)
    daxwug_joint                   --dataset daxwug --order joint: Fig. 4
Then collect() reads those outputs into results.json, and render() (a pure function of it) writes REPORT.md.
"""
import copy
import dataclasses
import gc
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

import cli
import data
import graft
import scores
import train
from checkpoint import (DEFAULT_NAME, atomic_dir, check_output, from_pretrained, load_tokenizer, read_json as _read,
                        resolve, work_dir, write_json)
from paper import CHANCE, TABLE2 as PAPER_TABLE2

HOPS = ("first_hop", "second_hop")
ORDERS = ("facts_first", "impl_first", "joint")


def log(msg):
    print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(path):
    return _read(path) if path.exists() else None


# --- stages ------------------------------------------------------------------------------------------------

def freeze_post(model, ckpt, hop, seed, out, device):
    """Table 2 "post": the finetune `ckpt` with the early or late layers reset to the base `model`, evaluated."""
    ds = data.load_dataset(hop, seed=seed)
    base = resolve(model)
    tok = load_tokenizer(base)
    res = {}
    for which in ("early", "late"):
        m = from_pretrained(ckpt, device=device)
        m.source = base                         # train.reset_layers copies from model.source: the base W
        layers = train.split_layers(m.config.n_layers, which)
        train.reset_layers(m, layers)
        res[which] = {"layers": layers, "fact_mean_rank": data.mean_rank(m, tok, ds["facts"]),
                      "impl_mean_rank": data.mean_rank(m, tok, ds["implications"])}
        log(f"{hop} reset {which} layers {layers[0]}..{layers[-1]}: fact {res[which]['fact_mean_rank']:.2f} "
            f"impl {res[which]['impl_mean_rank']:.2f}")
    write_json(out, res)


def finetune_stage(base, s: train.Settings):
    """train.py with settings `s`, in this process, from a copy of the loaded base model."""
    model, metrics = train.run(s, log=log, model=copy.deepcopy(base))
    train.save(model, s.out, metrics, log=log)


def stages(model, seed, w, base, device):
    """(name, output that marks it done, action) for one seed, cheapest first. `base`: the loaded base model."""
    s = train.Settings(model=str(model), seed=seed, device=device, threads=torch.get_num_threads())
    fine = lambda out, **kw: (lambda: finetune_stage(base, dataclasses.replace(s, out=str(out), **kw)))
    out = []
    for hop in HOPS:
        out.append((hop, w / hop / "metrics.json", fine(w / hop, dataset=hop)))
        out.append((f"scores_{hop}", w / f"scores_{hop}" / "scores.safetensors",
                    lambda hop=hop: scores.run(model, w / hop, w / f"scores_{hop}", device=device, log=log)))
        out.append((f"freeze_post_{hop}", w / f"freeze_post_{hop}.json",
                    lambda hop=hop: freeze_post(model, w / hop, hop, seed, w / f"freeze_post_{hop}.json", device)))
        for which in ("early", "late"):
            d = w / f"{hop}_{which}_pre"
            out.append((d.name, d / "metrics.json", fine(d, dataset=hop, freeze=which, freeze_when="pre")))
    out.append(("graft", w / "graft" / "results.json",
                lambda: graft.experiment(model, seed, w / "graft", device, log, base_model=base)))
    out.append(("daxwug_impl_first", w / "daxwug_impl_first" / "metrics.json", lambda: impl_first(s, w)))
    d = w / "daxwug_joint"
    out.append((d.name, d / "metrics.json", fine(d, dataset="daxwug", order="joint")))
    return out


def impl_first(s, w):
    """Fig. 4 implications-first: graft.py's W_ImplF (the base trained on Impl F), then the train facts, then the
    test facts; the phases, seed and fresh optimizers of `train.py --order impl_first`, one training fewer."""
    d = data.load_dataset("daxwug", seed=s.seed)
    g, out = w / "graft", work_dir(w / "daxwug_impl_first", "report-stage")
    first = read_json(g / "W_ImplF" / "metrics.json")
    if first is None:
        raise RuntimeError(f"{g / 'W_ImplF'} is missing: the graft stage has to run first")
    second = graft.train_stage(g / "W_ImplF", d["train_facts"], d["train_impls"], out / "W_ImplF_F", s, log)
    third = graft.train_stage(out / "W_ImplF_F", d["test_facts"], d["test_impls"], out / "W_ImplF_F_test", s, log)
    records = [{**r, "phase": "pretrain_impls"} for r in graft.swap(first["records"])] + \
        [{**r, "phase": "pretrain_facts"} for r in second["records"]] + \
        [{**r, "phase": "finetune"} for r in third["records"]]
    write_json(out / "metrics.json", {"order": "impl_first", "seed": s.seed, "records": records,
                                      "built_from": [str(g / "W_ImplF"), str(out / "W_ImplF_F"),
                                                     str(out / "W_ImplF_F_test")]})


def run_stages(model, seeds, work, device="cpu"):
    """Run what is not done yet; every stage's time, status and error go to seed{s}/stage_times.json."""
    base = None
    for seed in seeds:
        w = work_dir(work / f"seed{seed}", "report-work")
        times_file = w / "stage_times.json"
        times = read_json(times_file) or {}
        todo = stages(model, seed, w, base, device)
        pending = [t for t in todo if not t[1].exists()]
        if pending and base is None:
            base = from_pretrained(model, device=device)          # loaded once, copied by each training stage
        todo = stages(model, seed, w, base, device)
        for i, (name, done, action) in enumerate(todo, 1):
            if done.exists():
                log(f"seed {seed} stage {i}/{len(todo)} {name}: done before, reused")
                if times.get(name, {}).get("status") in (None, "failed"):     # finished outside this tool
                    times[name] = {"status": "reused", "seconds": None}
                continue
            log(f"seed {seed} stage {i}/{len(todo)} {name}: running")
            t0, load = time.time(), os.getloadavg()[0]
            try:
                action()
                times[name] = {"status": "ok", "seconds": round(time.time() - t0, 1), "load_at_start": load}
                log(f"seed {seed} {name}: done in {time.time() - t0:.0f} s")
            except Exception as e:                 # report it and go on: finished stages stay as they are
                times[name] = {"status": "failed", "seconds": round(time.time() - t0, 1), "error": str(e)[:300]}
                log(f"seed {seed} {name}: FAILED: {type(e).__name__}: {e}")
            gc.collect()                           # free the stage's models before the next one
            write_json(times_file, times)


# --- collecting the results ------------------------------------------------------------------------------

def final(records, phase=None):
    rs = [r for r in records if phase is None or r["phase"] == phase]
    return rs[-1] if rs else None


def localization(path):
    """Fig. 3 summary of one scores.safetensors: the layer centroid (0 = first, 1 = last layer) and the share at
    the last position of the positive part of the informative MLP scores."""
    from safetensors.torch import load_file
    p = load_file(str(path))["informative.mlp"].clamp(min=0)       # (Ta, L)
    total = float(p.sum()) or 1.0
    L = p.shape[1]
    centroid = float((p.sum(0) * torch.arange(L)).sum()) / total / max(L - 1, 1)
    return {"centroid": centroid, "last_share": float(p[-1].sum()) / total}


def collect(model, seeds, work):
    """Everything REPORT.md needs, from the stage outputs under `work`; a missing output is None."""
    res = {"model": str(model), "seeds": list(seeds), "work": str(work), "fig2": {}, "fig3": {}, "table2": {},
           "fig4": {o: [] for o in ORDERS}, "table3": None, "fig6": None, "stage_times": {}, "settings": {}}
    t2 = {row: {hop: {"fact": [], "impl": []} for hop in HOPS} for row in PAPER_TABLE2}
    t3, f6 = {}, {"mlp": {"r": [], "p": [], "n": None}, "heads": {"r": [], "p": [], "n": None}}

    def add(row, hop, rec):
        if rec is not None:
            t2[row][hop]["fact"].append(rec["fact_mean_rank"])
            t2[row][hop]["impl"].append(rec["impl_mean_rank"])

    for seed in seeds:
        w = Path(work) / f"seed{seed}"
        res["stage_times"][str(seed)] = read_json(w / "stage_times.json") or {}
        for hop in HOPS:
            m = read_json(w / hop / "metrics.json")
            res["fig2"].setdefault(hop, []).append(m["records"] if m else None)
            if m:
                add("None", hop, final(m["records"]))
                add("All", hop, m["records"][0])                          # epoch 0: the base model's ranks
                if not res["settings"]:
                    a = m["args"]
                    res["settings"] = {k: a.get(k) for k in ("lr", "epochs", "batch_size", "constant_lr", "dtype",
                                                             "train_all", "threads")}
                    res["settings"].update(n_params=m.get("n_params"), n_trainable=m.get("n_trainable"),
                                           base_model=m.get("base_model"))
            post = read_json(w / f"freeze_post_{hop}.json")
            for which in ("early", "late"):
                if post:
                    add(which.capitalize(), hop, post[which])
                    res["settings"][f"{which}_layers"] = post[which]["layers"]
                pre = read_json(w / f"{hop}_{which}_pre" / "metrics.json")
                add(f"{which.capitalize()} (pre)", hop, final(pre["records"]) if pre else None)
            sc = w / f"scores_{hop}" / "scores.safetensors"
            entry = res["fig3"].setdefault(hop, {"png": None, "stats": []})
            if sc.exists():
                entry["stats"].append(localization(sc))
                entry["png"] = entry["png"] or str(sc.with_name("scores.png"))
        g = read_json(w / "graft" / "results.json")
        if g:
            for wname, cols in g["table3"].items():
                for c, v in cols.items():
                    t3.setdefault(wname, {}).setdefault(c, []).append(v)
            for comp in ("mlp", "heads"):
                f6[comp]["r"].append(g["fig6"][comp]["r"])
                f6[comp]["p"].append(g["fig6"][comp]["p"])
                f6[comp]["n"] = g["fig6"][comp]["n"]
            res["fig6_png"] = res.get("fig6_png") or str(w / "graft" / "fig6.png")
        res["fig4"]["facts_first"].append(g["fig4_facts_first"] if g else None)
        for order in ("impl_first", "joint"):
            m = read_json(w / f"daxwug_{order}" / "metrics.json")
            res["fig4"][order].append(m["records"] if m else None)
    res["table2"] = t2
    res["table3"] = t3 or None
    res["fig6"] = f6 if f6["mlp"]["r"] else None
    return res


# --- rendering: a pure function of the collected results ---------------------------------------------------

def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def fmt(xs):
    """mean, with ± sample standard deviation over seeds when there is more than one; '—' when missing."""
    xs = [x for x in (xs or []) if x is not None]
    if not xs:
        return "—"
    return f"{statistics.fmean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def finals(runs, phase=None):
    """Final fact and impl ranks over seeds of a list of per-seed record lists."""
    recs = [final(r, phase) for r in runs if r]
    return [r["fact_mean_rank"] for r in recs if r], [r["impl_mean_rank"] for r in recs if r]


def grade(n_ok, n_all, partly_ok=None):
    return "reproduced" if n_ok == n_all else "partly" if (partly_ok if partly_ok is not None else n_ok > 0) else "not"


def verdicts(res):
    """(claim, verdict, criterion, evidence) per claim; the criteria were fixed before any result was seen."""
    out = []
    for hop in HOPS:                                                             # Fig. 2
        runs = [r for r in res["fig2"].get(hop, []) if r]
        if not runs:
            out.append((f"Fig. 2 {hop} OCR", "missing", "stage failed or not run", ""))
            continue
        f, i = finals(runs)
        before = mean([r[0]["impl_mean_rank"] for r in runs])
        drop, learned = before - mean(i), mean(f) <= 1.0
        v = "reproduced" if learned and drop >= 2 else "partly" if learned and drop >= 0.5 else "not"
        out.append((f"Fig. 2 {hop.replace('_', '-')} OCR: finetuning on facts lowers the implication rank", v,
                    "facts learned (final fact rank <= 1) and the implication rank falls >= 2 below its value before "
                    "training (partly: >= 0.5)",
                    f"fact {mean(f):.2f}; impl {before:.2f} -> {mean(i):.2f}"))
    st = {h: res["fig3"].get(h, {}).get("stats") for h in HOPS}                  # Fig. 3
    if all(st.values()):
        c = {h: mean([s["centroid"] for s in st[h]]) for h in HOPS}
        last = {h: mean([s["last_share"] for s in st[h]]) for h in HOPS}
        ok = [c["first_hop"] < c["second_hop"], last["first_hop"] < last["second_hop"]]
        out.append(("Fig. 3: first-hop informative MLPs sit earlier and off the last token; second-hop late, at the "
                    "last token", grade(sum(ok), 2),
                    "(a) layer centroid of the positive informative MLP score lower for first hop than second hop; "
                    "(b) its share at the last position smaller for first hop; both: reproduced, one: partly",
                    f"centroid {c['first_hop']:.2f} vs {c['second_hop']:.2f}; last-token share "
                    f"{last['first_hop']:.2f} vs {last['second_hop']:.2f}"))
    else:
        out.append(("Fig. 3 localization", "missing", "stage failed or not run", ""))
    t2 = res["table2"]
    m2 = {(row, hop, k): mean(t2[row][hop][k]) for row in t2 for hop in HOPS for k in ("fact", "impl")}
    if all(v is not None for (row, _, _), v in m2.items() if row in ("None", "Early", "Late")):
        d = lambda row, hop: m2[(row, hop, "impl")] - m2[("None", hop, "impl")]
        ok = [d("Early", "first_hop") >= 2 and d("Early", "first_hop") > d("Late", "first_hop"),
              d("Late", "second_hop") >= 2 and d("Late", "second_hop") > d("Early", "second_hop")]
        out.append(("Table 2 (post): freezing early layers harms first-hop OCR, late layers second-hop OCR",
                    grade(sum(ok), 2),
                    "(a) first hop: Early raises the impl rank >= 2 above None, and more than Late does; (b) second "
                    "hop: Late raises it >= 2, and more than Early does; both: reproduced, one: partly",
                    f"impl rank change vs None: first hop Early {d('Early', 'first_hop'):+.2f}, Late "
                    f"{d('Late', 'first_hop'):+.2f}; second hop Early {d('Early', 'second_hop'):+.2f}, Late "
                    f"{d('Late', 'second_hop'):+.2f}"))
    else:
        out.append(("Table 2 (post)", "missing", "stage failed or not run", ""))
    if all(v is not None for (row, _, _), v in m2.items() if row in ("None", "Early (pre)", "Late (pre)")):
        g = lambda row, hop, k="impl": m2[(row, hop, k)]
        ok = [g("Early (pre)", "first_hop", "fact") <= 1 and g("Early (pre)", "first_hop") >= g("None", "first_hop") + 2
              and g("Early (pre)", "second_hop") <= g("None", "second_hop") + 1,
              g("Late (pre)", "second_hop", "fact") <= 1 and g("Late (pre)", "second_hop") >= g("None", "second_hop") + 2
              and g("Late (pre)", "first_hop") <= g("None", "first_hop") + 1]
        out.append(("Table 2 (pre): facts stored elsewhere are learned but do not give that hop's OCR",
                    grade(sum(ok), 2),
                    "(a) Early (pre): first-hop facts learned (<= 1), first-hop impl >= None + 2, second-hop impl "
                    "<= None + 1; (b) Late (pre): the same with the hops swapped; both: reproduced, one: partly",
                    f"Early (pre) impl {g('Early (pre)', 'first_hop'):.2f} / {g('Early (pre)', 'second_hop'):.2f}, "
                    f"Late (pre) impl {g('Late (pre)', 'first_hop'):.2f} / {g('Late (pre)', 'second_hop'):.2f}, "
                    f"None {g('None', 'first_hop'):.2f} / {g('None', 'second_hop'):.2f} (first / second hop)"))
    else:
        out.append(("Table 2 (pre)", "missing", "stage failed or not run", ""))
    f4 = {o: [r for r in res["fig4"][o] if r] for o in ORDERS}                  # Fig. 4
    if all(f4.values()):
        test = {o: finals(f4[o], "finetune") for o in ORDERS}
        ocr = [mean(test[o][1]) <= mean(test["impl_first"][1]) - 2 for o in ("facts_first", "joint")]
        pre_ok = all(mean([final(r, ph)[k] for r in f4[o]]) <= 1.0
                     for o in ORDERS for ph, k in (("pretrain_facts", "fact_mean_rank"),
                                                   ("pretrain_impls", "impl_mean_rank"),
                                                   ("pretrain_joint", "fact_mean_rank"),
                                                   ("pretrain_joint", "impl_mean_rank"))
                     if any(rr["phase"] == ph for rr in f4[o][0]))
        v = "reproduced" if all(ocr) and pre_ok else "partly" if any(ocr) else "not"
        out.append(("Fig. 4: OCR on new facts only when facts precede (or mix with) implications in continued "
                    "pretraining", v,
                    "test-implication rank after the test-fact finetune >= 2 lower for facts_first and for joint than "
                    "for impl_first, and every ordering learns its train facts and implications (rank <= 1 at the end "
                    "of their phase); partly: the rank gap holds for one of the two",
                    "test impl " + ", ".join(f"{o} {mean(test[o][1]):.2f}" for o in ORDERS)
                    + f"; train splits learned: {pre_ok}"))
    else:
        out.append(("Fig. 4 data ordering", "missing", "stage failed or not run", ""))
    t3 = res["table3"]                                                           # Table 3
    if t3:
        g = lambda w, c: mean(t3[w][c])
        WF, IFP = "W_F'", "Impl F'"
        ok = [g("W_graft", IFP) <= g(WF, IFP) - 2, g("W~_graft", IFP) >= g("W_graft", IFP) + 2,
              g("W~_graft", "Impl F") <= g(WF, "Impl F") - 2]
        out.append(("Table 3: grafting W_F,ImplF - W_F transfers the extractive structure (Impl F'), the control "
                    "transfers only the memorized Impl F", grade(sum(ok), 3, partly_ok=ok[0]),
                    "(i) W_graft Impl F' <= W_F' Impl F' - 2; (ii) W~_graft Impl F' >= W_graft Impl F' + 2; (iii) "
                    "W~_graft Impl F <= W_F' Impl F - 2; all: reproduced, (i) and not all: partly",
                    f"Impl F': W_F' {g(WF, IFP):.2f}, W_graft {g('W_graft', IFP):.2f}, W~_graft "
                    f"{g('W~_graft', IFP):.2f}; Impl F: W_F' {g(WF, 'Impl F'):.2f}, W~_graft {g('W~_graft', 'Impl F'):.2f}"))
    else:
        out.append(("Table 3 grafting", "missing", "stage failed or not run", ""))
    f6 = res["fig6"]                                                             # Fig. 6
    if f6:
        ok = [mean(f6[c]["r"]) > 0 and mean(f6[c]["p"]) < 0.05 for c in ("mlp", "heads")]
        out.append(("Fig. 6: downstream and grafting-informative scores correlate positively and significantly",
                    grade(sum(ok), 2), "Pearson r > 0 with two-sided p < 0.05 for MLPs and for heads; one of the two: "
                    "partly", "; ".join(f"{c}: r {mean(f6[c]['r']):+.3f}, p {mean(f6[c]['p']):.2g}"
                                        for c in ("mlp", "heads"))))
    else:
        out.append(("Fig. 6 correlation", "missing", "stage failed or not run", ""))
    return out


def render(res, figures):
    """REPORT.md as a string, from collect()'s dict and {figure key: file name next to REPORT.md or None}."""
    n = len(res["seeds"])
    spread = "mean ± sample standard deviation over seeds" if n > 1 else "one seed"
    s = res.get("settings", {})
    img = lambda key, alt: f"![{alt}]({figures[key]})" if figures.get(key) else f"*{alt}: not available (stage failed)*"
    L = [f"# Extractive structures on {res['model']}: the paper's tables and figures", "",
         f"Generated by `python report.py --model {res['model']} --seeds {n}`. Our numbers: {spread} "
         f"(seeds {', '.join(map(str, res['seeds']))}). Paper: OLMo-7B (pre-anneal checkpoint), from the paper's text. "
         f"Mean rank: 0 = always right, {CHANCE} = chance among 20 candidates.", "", "## Verdicts", "",
         "| claim | verdict | criterion (fixed before the results) | ours |", "|---|---|---|---|"]
    for claim, v, crit, ev in verdicts(res):
        L.append(f"| {claim} | **{v}** | {crit} | {ev} |")
    L += ["", "## Settings", "",
          f"- model `{res['model']}` ({s.get('base_model', '?')}), {s.get('n_params') or 0:,} parameters, "
          f"{s.get('n_trainable') or 0:,} trained (transformer blocks; embeddings, final norm and head frozen)",
          f"- Adam (0.9, 0.999, 1e-8), lr {s.get('lr')}, {'constant' if s.get('constant_lr') else '10% warmup + linear decay'}, "
          f"batch {s.get('batch_size')}, {s.get('epochs')} epochs per phase, {s.get('dtype')}; paper: 3e-6 on OLMo-7B",
          f"- Table 2 early layers {_span(s.get('early_layers'))}, late layers {_span(s.get('late_layers'))} (first 75% / "
          "last 25%); Early / Late (post) reset those layers of the plain finetune to the base, which is what "
          "`train.py --freeze X --freeze-when post` computes after training the same model with the same seed",
          "- Fig. 4 facts_first is graft.py's chain W -> W_F -> W_F,ImplF -> finetune on test facts, impl_first the chain "
          "W -> W_ImplF -> + train facts -> + test facts: the same phases, seed and fresh optimizers as "
          "`train.py --order facts_first / impl_first`; joint is `train.py --order joint`",
          "- Fig. 6: downstream scores of W_F,ImplF -> (W_F,ImplF finetuned on the test facts), on the test "
          "implications; informative scores of W_F' -> W_graft on Impl F'; per component summed over positions, "
          "averaged over prompts; two-sided p of the t test with n - 2 degrees of freedom",
          f"- stage outputs (checkpoints) under `{res['work']}`", ""]
    # Fig. 2
    L += ["## Fig. 2: OCR while finetuning on facts", "",
          "Paper (OLMo-7B): fact and implication ranks both fall to about 0 for the first hop; for the second hop the "
          "facts reach 0 and the implications fall well below chance (final 1.80, Table 2 None).", "",
          "| hop | fact rank before | fact rank after | impl rank before | impl rank after | paper impl after |",
          "|---|---|---|---|---|---|"]
    for hop, paper in zip(HOPS, (0.00, 1.80)):
        runs = [r for r in res["fig2"].get(hop, []) if r]
        f, i = finals(runs)
        L.append(f"| {hop} | {fmt([r[0]['fact_mean_rank'] for r in runs])} | {fmt(f)} | "
                 f"{fmt([r[0]['impl_mean_rank'] for r in runs])} | {fmt(i)} | {paper:.2f} |")
    L += ["", img("fig2", "Fig. 2: mean ranks against epoch"), ""]
    # Fig. 3
    L += ["## Fig. 3: extractive scores", "",
          "Paper: informative MLPs at early-middle layers of the name tokens for the first hop, late layers at the last "
          "token for the second hop; downstream scores mostly in late layers at the last token.", ""]
    for hop in HOPS:
        st = res["fig3"].get(hop, {}).get("stats") or []
        L.append(f"- {hop}: informative MLP layer centroid {fmt([x['centroid'] for x in st])} (0 first, 1 last layer), "
                 f"share at the last token {fmt([x['last_share'] for x in st])}")
    L += [""] + [img(f"fig3_{hop}", f"Fig. 3 {hop}") + "\n" for hop in HOPS]
    # Table 2
    L += ["## Table 2: freezing", "", "| frozen | 1st fact | paper | 1st impl | paper | 2nd fact | paper | 2nd impl | paper |",
          "|---|---|---|---|---|---|---|---|---|"]
    for row, paper in PAPER_TABLE2.items():
        cells = [c for hop_i, hop in enumerate(HOPS) for k_i, k in enumerate(("fact", "impl"))
                 for c in (fmt(res["table2"][row][hop][k]), f"{paper[2 * hop_i + k_i]:.2f}")]
        L.append(f"| {row} | " + " | ".join(cells) + " |")
    L += ["", "None: the plain finetune; All: the base model; Early / Late: layers reset to the base after finetuning; "
          "(pre): those layers never trained.", ""]
    # Fig. 4
    L += ["## Fig. 4: data ordering in continued pretraining (daxwug)", "",
          "Paper: every ordering learns the training facts and implications, but after finetuning on the test facts "
          "only facts-first and joint (shuffled) generalize to the test implications; implications-first does not.", "",
          "| ordering | train fact rank | train impl rank | test fact rank | test impl rank |", "|---|---|---|---|---|"]
    for o in ORDERS:
        runs = [r for r in res["fig4"][o] if r]
        pre = [[x for x in r if x["phase"] != "finetune"] for r in runs]
        f, i = finals(pre)
        tf, ti = finals(runs, "finetune")
        L.append(f"| {o} | {fmt(f)} | {fmt(i)} | {fmt(tf)} | {fmt(ti)} |")
    L += ["", "(train ranks at the end of continued pretraining; test ranks after the test-fact finetune)", "",
          img("fig4", "Fig. 4: continued pretraining (left), finetuning on test facts (right)"), ""]
    # Table 3
    cols = graft.TABLE3_COLS
    L += ["## Table 3: weight grafting", "", "| weights | " + " | ".join(f"{c} | paper" for c in cols) + " |",
          "|---" * 7 + "|"]
    t3 = res["table3"] or {}
    for w, paper in graft.PAPER_TABLE3.items():
        L.append(f"| {w} | " + " | ".join(f"{fmt(t3.get(w, {}).get(c))} | {p:.2f}" for c, p in zip(cols, paper))
                 + " |")
    if "W (base)" in t3:
        L.append("| W (base, ours only) | " + " | ".join(f"{fmt(t3['W (base)'].get(c))} | —" for c in cols) + " |")
    L += ["", "W_graft = W_F' + (W_F,ImplF - W_F); W~_graft = W_F' + (W_ImplF - W).", ""]
    # Fig. 6
    L += ["## Fig. 6: downstream against informative scores of the graft", "",
          "Paper: a statistically significant positive, but small, Pearson correlation for MLPs and for heads.", "",
          "| components | n | Pearson r | p (two-sided) |", "|---|---|---|---|"]
    f6 = res["fig6"]
    for c in ("mlp", "heads"):
        L.append(f"| {c} | {f6[c]['n'] if f6 else '—'} | {fmt(f6[c]['r']) if f6 else '—'} | "
                 f"{(', '.join(f'{p:.2g}' for p in f6[c]['p'])) if f6 else '—'} |")
    L += ["", img("fig6", "Fig. 6: scatter, MLPs (left) and heads (right)"), ""]
    # times
    L += ["## Stage times", "", "Wall seconds per stage (load = the 1-minute load average when it started; "
          f"the machine has {res.get('cpus', '?')} CPUs).", "", "| seed | stage | status | seconds | load |",
          "|---|---|---|---|---|"]
    total = 0.0
    for seed, times in res["stage_times"].items():
        for name, t in times.items():
            total += t.get("seconds") or 0
            err = f" ({t['error']})" if t.get("error") else ""
            L.append(f"| {seed} | {name} | {t.get('status')}{err} | {t.get('seconds') if t.get('seconds') is not None else '—'} | "
                     f"{t.get('load_at_start', '—') if t.get('load_at_start') is None else round(t['load_at_start'], 1)} |")
    L += ["", f"Total of the timed stages: {total:.0f} s ({total / 60:.1f} min).", ""]
    failed = [(seed, n_) for seed, ts in res["stage_times"].items() for n_, t in ts.items() if t.get("status") == "failed"]
    if failed:
        L += ["## Failed stages", ""] + [f"- seed {seed}: {n_}: {res['stage_times'][seed][n_].get('error')}"
                                         for seed, n_ in failed] + [""]
    return "\n".join(L)


def _span(layers):
    return f"{layers[0]}..{layers[-1]}" if layers else "?"


# --- figures ---------------------------------------------------------------------------------------------

def _band(ax, runs, key, x_of, **kw):
    """Mean over seeds with a min-max band."""
    ys = torch.tensor([[r[key] for r in run] for run in runs], dtype=torch.float64)    # (seeds, epochs)
    x = x_of(runs[0])
    ax.plot(x, ys.mean(0), **kw)
    if len(runs) > 1:
        ax.fill_between(x, ys.min(0).values, ys.max(0).values, alpha=0.2, color=ax.lines[-1].get_color())


def make_figures(res, out):
    """Fig. 2 and Fig. 4 drawn from the records; Fig. 3 and Fig. 6 copied from their stages. {key: file name}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = {}
    runs2 = {h: [r for r in res["fig2"].get(h, []) if r] for h in HOPS}
    if any(runs2.values()):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
        for ax, hop in zip(axes, HOPS):
            if runs2[hop]:
                ep = lambda run: [r["epoch"] for r in run]
                _band(ax, runs2[hop], "fact_mean_rank", ep, marker="o", label="facts")
                _band(ax, runs2[hop], "impl_mean_rank", ep, marker="s", label="implications")
            ax.axhline(CHANCE, ls=":", color="grey", label="chance")
            ax.set(title=hop.replace("_", "-"), xlabel="epoch")
        axes[0].set(ylabel="mean rank")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "fig2.png", dpi=110)
        plt.close(fig)
        figs["fig2"] = "fig2.png"
    runs4 = {o: [r for r in res["fig4"][o] if r] for o in ORDERS}
    if any(runs4.values()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for o, color in zip(ORDERS, ("C0", "C1", "C2")):
            if not runs4[o]:
                continue
            pre = [[x for x in r if x["phase"] != "finetune"] for r in runs4[o]]
            ft = [[x for x in r if x["phase"] == "finetune"] for r in runs4[o]]
            step = lambda run: list(range(len(run)))                  # evaluations in order, across phases
            _band(axes[0], pre, "fact_mean_rank", step, color=color, label=f"{o}: facts")
            _band(axes[0], pre, "impl_mean_rank", step, color=color, ls="--", label=f"{o}: impls")
            _band(axes[1], ft, "fact_mean_rank", lambda run: [r["epoch"] for r in run], color=color, label=f"{o}: facts")
            _band(axes[1], ft, "impl_mean_rank", lambda run: [r["epoch"] for r in run], color=color, ls="--",
                  label=f"{o}: impls")
        for ax, t in zip(axes, ("continued pretraining (train split)", "finetuning on test facts")):
            ax.axhline(CHANCE, ls=":", color="grey")
            ax.set(title=t, xlabel="evaluation (epochs, phases in order)" if ax is axes[0] else "epoch",
                   ylabel="mean rank")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fig4.png", dpi=110)
        plt.close(fig)
        figs["fig4"] = "fig4.png"
    for hop in HOPS:
        png = res["fig3"].get(hop, {}).get("png")
        if png and Path(png).exists():
            shutil.copy(png, out / f"fig3_{hop}.png")
            figs[f"fig3_{hop}"] = f"fig3_{hop}.png"
    if res.get("fig6_png") and Path(res["fig6_png"]).exists():
        shutil.copy(res["fig6_png"], out / "fig6.png")
        figs["fig6"] = "fig6.png"
    return figs


def write_report(model, seeds, work, out, overwrite=False):
    res = collect(model, seeds, work)
    res["cpus"] = os.cpu_count()
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    with atomic_dir(out, "report", overwrite, log=log) as tmp:      # REPORT.md, figures, results.json at once
        figs = make_figures(res, tmp)
        write_json(tmp / "results.json", res)
        (tmp / "REPORT.md").write_text(render(res, figs))
    return res


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", default=DEFAULT_NAME, help="base model: the embedded default, a directory or a hub id")
    p.add_argument("--seeds", type=cli.positive_int, default=1, help="repeat every stage over seeds 0..N-1")
    p.add_argument("--out", default=None, help="where REPORT.md, its figures and results.json go "
                                               "(default results/<model name>)")
    p.add_argument("--work", default=None, help="stage outputs, checkpoints included (default runs/report/<model name>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a report of ours")
    p.add_argument("--render-only", action="store_true", help="only rebuild REPORT.md from finished stages")
    p.add_argument("--device", type=cli.device_name, default=cli.default_device(), help="torch device")
    p.add_argument("--threads", type=cli.positive_int, default=cli.cpu_count(), help="CPU threads for torch")
    args = p.parse_args(argv)
    name = Path(str(args.model)).name
    out = Path(args.out or Path("results") / name)
    work = Path(args.work or Path("runs") / "report" / name)
    seeds = list(range(args.seeds))
    torch.set_num_threads(args.threads)

    def work_():
        t0 = time.time()
        check_output(out, "report", args.overwrite, log=log)       # before hours of stages, not after
        if not args.render_only:
            run_stages(args.model, seeds, work, args.device)
        res = write_report(args.model, seeds, work, out, args.overwrite)
        for claim, v, _, ev in verdicts(res):
            log(f"{v:>10}  {claim}  [{ev}]")
        log(f"wrote {out}/REPORT.md in {time.time() - t0:.0f} s")
    return cli.run(work_)


if __name__ == "__main__":
    main()
