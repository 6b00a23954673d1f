"""The paper's claims as a table: each claim's wording, its precondition, its criterion (wording and function)
and its evidence, as small functions over collect()'s results. Verdicts are on the means over seeds; where a
claim compares two conditions measured on the same seeds, the difference must also hold across seeds (paired
sign-flip test, paper_report/stats.py).

    reproduced    every part of the criterion holds
    partly        the part named in the criterion holds, not all
    not           the criterion fails
    inconclusive  a precondition fails: the facts were never learned, the base model does not know the hop the
                  implication needs, or the mechanism's premise fails (Table 3, Fig. 4: the facts F are forgotten
                  while Impl F is learned), so the claim cannot be tested on this run
    missing       a stage the claim needs failed or was not run
"""
from collections import namedtuple

from paper_report import paper
from paper_report.stats import mean, mean_se, paired, show

HOPS = ("first_hop", "second_hop")
ORDERS = ("facts_first", "impl_first", "joint")
ALL_ORDERS = ORDERS + ("facts_first_replay",)       # ours beyond the paper: facts-first with the facts replayed

# --- thresholds, each with why ----------------------------------------------------------------------------

LEARNED = 1.0       # facts "learned": final mean rank <= 1 of chance 9.5; the paper's learned facts sit at 0.00-0.10
BASE_KNOWS = 2.0    # the base model "knows" a hop (city -> language, landmark -> city) at mean rank <= 2 of 9.5
CLEAR = 2.0         # a clear change of mean rank: the paper's effects are 5-8 (Table 2 0.00 -> 8.40, Table 3 9.13
                    # -> 1.13), seed-to-seed spread on our default model is up to about 4 (first-hop impl 1.45-5.30)
SOME = 0.5          # a smaller fall that still counts for "partly" in Fig. 2
UNCHANGED = 1.0     # "does not harm": the paper's no-effect entries move by 0.00-0.05 (Table 2 1.80 -> 1.85); 1.0
                    # allows for a small model's noise but not the 3.10 rise the issue found
MOSTLY = 0.5        # "mostly in": more than half of the positive score
LATE = 2 / 3        # "late layers" start at 2/3 of the depth (Sec. 5.3: "late layers (last 1/3)")
ALPHA = 0.05        # significance level of every test


# one row of the claims table: data(res) -> the numbers (None: a stage is missing); precondition(d) -> [(text,
# ok)]; criterion(d) -> verdict; evidence(d) -> the numbers as text
Claim = namedtuple("Claim", "id title wording data precondition criterion_text criterion evidence")


def consistent(pr):
    """The paired difference holds across seeds: sign-flip p <= ALPHA, or, with fewer than 5 seeds (where the
    exact p cannot go below 2^-n > 0.05), p at its floor 2^-n: every seed's difference has the claimed sign."""
    return pr["p"] is not None and pr["p"] <= max(ALPHA, 2.0 ** -pr["n"]) + 1e-12


def fmt(xs, digits=2):
    """'mean ± standard error' over seeds; 'mean' for one seed; '—' when none."""
    m, se, n = mean_se(xs)
    if m is None:
        return "—"
    return f"{m:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def fmt_diff(pr):
    return f"{pr['diff']:+.2f} ± {pr['se'] or 0:.2f} (sign-flip p {pr['p']:.3g}, n {pr['n']})" if pr["n"] else "—"


def grade(parts, partly):
    """'reproduced' if every part holds, 'partly' if `partly` does, else 'not'."""
    return "reproduced" if all(parts) else "partly" if partly else "not"


# --- the numbers the claims read, per seed -------------------------------------------------------------------

def final(records, phase=None):
    rs = [r for r in records or [] if phase is None or r["phase"] == phase]
    return rs[-1] if rs else None


def per_seed(runs, pick):
    """pick(records) for each seed's records; None where that seed has none."""
    return [pick(r) if r else None for r in runs]


def t2(res, row, hop, kind):
    return res["table2"][row][hop][kind]


def base_rank(res, key):
    return mean([p.get(key) if p else None for p in res.get("preconditions") or []])


# the known hop the implication needs from the base model: first-hop updates compose the new name -> city
# with the known city -> language; second-hop updates the new city -> mayor with the known landmark -> city
KNOWN_HOP = {"first_hop": ("city_language", "city -> language"), "second_hop": ("landmark_city", "landmark -> city")}


def base_condition(res, hop):
    key, words = KNOWN_HOP[hop]
    r = base_rank(res, key)
    if r is None:
        return f"base model knows {words}: not measured", None
    return f"base model knows {words} (rank {r:.2f} <= {BASE_KNOWS})", r <= BASE_KNOWS


def learned_condition(xs, words):
    m = mean(xs)
    if m is None:                                                 # the stage that measures it did not run
        return f"{words} learned: not measured", None
    return f"{words} learned (rank {m:.2f} <= {LEARNED})", m <= LEARNED


def hop_conditions(res, hops=HOPS):
    """Facts of the plain finetune learned and the base model knows the other hop, for each hop in `hops`."""
    out = []
    for hop in hops:
        out += [learned_condition(t2(res, "None", hop, "fact"), f"{hop.replace('_', '-')} facts"),
                base_condition(res, hop)]
    return out


# --- the claims ---------------------------------------------------------------------------------------------

def fig2_claim(hop):
    def data(res):
        runs = res["fig2"].get(hop) or []
        if not any(runs):
            return None
        before = per_seed(runs, lambda r: r[0]["impl_mean_rank"])            # epoch 0: the base model
        after = per_seed(runs, lambda r: final(r)["impl_mean_rank"])
        return {"res": res, "fact": per_seed(runs, lambda r: final(r)["fact_mean_rank"]), "before": before,
                "after": after, "drop": paired(after, before)}          # before - after: > 0 is a fall

    def pre(d):
        return [learned_condition(d["fact"], "facts"), base_condition(d["res"], hop)]

    def crit(d):
        drop = d["drop"]
        return "reproduced" if drop["diff"] >= CLEAR and consistent(drop) else \
            "partly" if drop["diff"] >= SOME else "not"

    def evidence(d):
        return f"fact {fmt(d['fact'])}; impl {fmt(d['before'])} -> {fmt(d['after'])}, fall {fmt_diff(d['drop'])}"

    return Claim(f"fig2_{hop}", f"Fig. 2 {hop.replace('_', '-')} OCR",
                 "finetuning on facts lowers the mean rank of their implications (the LM generalizes to "
                 "implications despite being only trained on facts)", data, pre,
                 f"the implication rank falls >= {CLEAR} from before training to the end, on every seed "
                 f"(paired); partly: falls >= {SOME} on the seed mean", crit, evidence)


def fig3_data(res):
    st = {h: res["fig3"].get(h, {}).get("stats") or [] for h in HOPS}
    if not all(any(st[h]) for h in HOPS):
        return None
    get = lambda h, k: [s[k] if s else None for s in st[h]]
    d = {"res": res, **{f"{k}_{h}": get(h, k) for h in HOPS for k in ("inf_centroid", "inf_last", "down_late_last")}}
    d["c"] = paired(d["inf_centroid_first_hop"], d["inf_centroid_second_hop"])      # second - first > 0
    d["l"] = paired(d["inf_last_first_hop"], d["inf_last_second_hop"])
    return d


def fig3_crit(d):
    parts = [d["c"]["diff"] > 0 and consistent(d["c"]), d["l"]["diff"] > 0 and consistent(d["l"])] + \
        [mean(d[f"down_late_last_{h}"]) > MOSTLY for h in HOPS]
    return grade(parts, partly=any(parts))


def fig3_evidence(d):
    return (f"informative MLP layer centroid {fmt(d['inf_centroid_first_hop'])} vs "
            f"{fmt(d['inf_centroid_second_hop'])}, last-token share {fmt(d['inf_last_first_hop'])} vs "
            f"{fmt(d['inf_last_second_hop'])} (first vs second hop); downstream share at late layers of the last "
            f"token {fmt(d['down_late_last_first_hop'])} / {fmt(d['down_late_last_second_hop'])}")


def table2_data(rows):
    def data(res):
        if any(mean(t2(res, row, hop, k)) is None for row in ("None",) + rows for hop in HOPS for k in ("fact", "impl")):
            return None
        d = {"res": res}
        for row in rows:                                           # the rise of each impl rank above None
            for hop in HOPS:
                d[row, hop] = paired(t2(res, "None", hop, "impl"), t2(res, row, hop, "impl"))
        return d
    return data


def table2_pre(d):
    return hop_conditions(d["res"])


def dissociation(d, row, harmed, spared):
    """Resetting / freezing `row` raises the `harmed` hop's impl rank clearly and leaves the `spared` hop's."""
    up, kept = d[row, harmed], d[row, spared]
    return up["diff"] >= CLEAR and consistent(up) and kept["diff"] <= UNCHANGED


def table2_post_crit(d):
    parts = [dissociation(d, "Early", "first_hop", "second_hop"), dissociation(d, "Late", "second_hop", "first_hop")]
    return grade(parts, partly=any(parts))


def table2_pre_crit(d):
    res = d["res"]
    parts = [mean(t2(res, "Early (pre)", "first_hop", "fact")) <= LEARNED
             and dissociation(d, "Early (pre)", "first_hop", "second_hop"),
             mean(t2(res, "Late (pre)", "second_hop", "fact")) <= LEARNED
             and dissociation(d, "Late (pre)", "second_hop", "first_hop")]
    return grade(parts, partly=any(parts))


def table2_evidence(rows):
    def evidence(d):
        out = [f"{row}: first-hop impl {fmt_diff(d[row, 'first_hop'])}, second-hop {fmt_diff(d[row, 'second_hop'])}"
               for row in rows]
        if "Early (pre)" in rows:
            out.append("facts " + ", ".join(f"{row} {fmt(t2(d['res'], row, hop, 'fact'))}"
                                            for row, hop in (("Early (pre)", "first_hop"), ("Late (pre)", "second_hop"))))
        return "rise above None: " + "; ".join(out)
    return evidence


def end_of_pretraining(records):
    """The last continued-pretraining record (before the test-fact finetune): both train splits at that point."""
    return final([r for r in records if r["phase"].startswith("pretrain")])


def fig4_data(res):
    runs = {o: res["fig4"][o] for o in ORDERS}
    if not all(any(runs[o]) for o in ORDERS):
        return None
    d = {}
    for o in ORDERS:
        d[o, "train_fact"] = per_seed(runs[o], lambda r: end_of_pretraining(r)["fact_mean_rank"])
        d[o, "train_impl"] = per_seed(runs[o], lambda r: end_of_pretraining(r)["impl_mean_rank"])
        d[o, "test_fact"] = per_seed(runs[o], lambda r: final(r, "finetune")["fact_mean_rank"])
        d[o, "test_impl"] = per_seed(runs[o], lambda r: final(r, "finetune")["impl_mean_rank"])
    for o in ("facts_first", "joint"):                           # impl_first - o > 0: o generalizes better
        d[o, "gap"] = paired(d[o, "test_impl"], d["impl_first", "test_impl"])
    return d


def fig4_pre(d):
    # the mechanism's premise: each ordering still knows its train facts at the end of continued pretraining (the
    # implications are learned on top of known facts); facts_first forgetting F while Impl F trains tests nothing
    return [learned_condition(d[o, "test_fact"], f"{o} test facts") for o in ORDERS] + \
        [learned_condition(d[o, "train_fact"], f"the premise: {o}'s train facts F at the end of continued "
                           "pretraining, still") for o in ORDERS]


def fig4_crit(d):
    gaps = [d[o, "gap"]["diff"] >= CLEAR and consistent(d[o, "gap"]) for o in ("facts_first", "joint")]
    kept = all(mean(d[o, "train_impl"]) <= LEARNED for o in ORDERS)
    return grade(gaps + [kept], partly=any(gaps))


def fig4_evidence(d):
    return ("test impl " + ", ".join(f"{o} {fmt(d[o, 'test_impl'])}" for o in ORDERS)
            + "; gap below impl_first: " + ", ".join(f"{o} {fmt_diff(d[o, 'gap'])}" for o in ("facts_first", "joint"))
            + "; train fact / impl at the end of continued pretraining: "
            + ", ".join(f"{o} {fmt(d[o, 'train_fact'])} / {fmt(d[o, 'train_impl'])}" for o in ORDERS))


def premise(res):
    """Per seed, the mean rank of the train facts F in W_F,ImplF (the graft chain, which is Fig. 4's facts_first,
    at the end of its Impl F phase): the mechanism's premise is that F is still known when Impl F is learned."""
    return per_seed(res["fig4"]["facts_first"], lambda r: end_of_pretraining(r)["fact_mean_rank"])


def premise_condition(res):
    return learned_condition(premise(res), "the premise: the facts F in W_F,ImplF, still")


def table3_data(res):
    t3 = res.get("table3")
    if not t3 or any(w not in t3 for w in paper.TABLE3):
        return None
    WF, IFP = "W_F'", "Impl F'"
    return {"t3": t3, "res": res, "i": paired(t3["W_graft"][IFP], t3[WF][IFP]),             # W_F' - W_graft on Impl F'
            "ii": paired(t3["W_graft"][IFP], t3["W~_graft"][IFP]),              # W~_graft - W_graft on Impl F'
            "iii": paired(t3["W~_graft"]["Impl F"], t3[WF]["Impl F"])}          # W_F' - W~_graft on Impl F


def table3_pre(d):
    return [learned_condition(d["t3"]["W_F'"]["F'"], "counterfactual facts F' (W_F')"), premise_condition(d["res"])]


def table3_crit(d):
    parts = [d[k]["diff"] >= CLEAR and consistent(d[k]) for k in ("i", "ii", "iii")]
    return grade(parts, partly=parts[0])


def table3_evidence(d):
    t3, IFP, WF = d["t3"], "Impl F'", "W_F'"
    return (f"Impl F': W_F' {fmt(t3[WF][IFP])}, W_graft {fmt(t3['W_graft'][IFP])}, "
            f"W~_graft {fmt(t3['W~_graft'][IFP])}; Impl F: W_F' {fmt(t3[WF]['Impl F'])}, "
            f"W~_graft {fmt(t3['W~_graft']['Impl F'])}; (i) {fmt_diff(d['i'])}, (ii) {fmt_diff(d['ii'])}, "
            f"(iii) {fmt_diff(d['iii'])}")


def fig6_data(key):
    """Fig. 6 in one definition: "fig6", the paper's text; "fig6_authors", the authors' code (graft.py)."""
    def data(res):
        f6 = res.get(key)
        if not f6 or not all(f6.get(c) for c in ("mlp", "heads")):
            return None
        # the downstream scores are those of graft.py's test-fact finetune of W_F,ImplF: Fig. 4's facts_first run
        test_fact = per_seed(res["fig4"]["facts_first"], lambda r: final(r, "finetune")["fact_mean_rank"])
        return {**f6, "test_fact": test_fact, "res": res}
    return data


def fig6_pre(d):
    # the downstream scores come from the test-fact finetune, which must learn its facts; and, as for Table 3, the
    # mechanism's premise: the informative side is the update W_F,ImplF - W_F (grafted, in the paper's text; itself,
    # in the authors' code), which holds an extractive structure only if F was still known while Impl F was learned.
    # Where F was forgotten the update is "forget F + memorize Impl F", and a correlation with it, or none, tests
    # nothing about the mechanism (issue 30)
    return [learned_condition(d["test_fact"], "test facts of the downstream finetune (W_F,ImplF -> + test facts)"),
            premise_condition(d["res"])]


def fig6_crit(d):
    parts = [d[c]["r"] is not None and d[c]["r"] > 0 and d[c]["p_perm"] < ALPHA for c in ("mlp", "heads")]
    return grade(parts, partly=any(parts))


def fig6_evidence(d):
    return "; ".join(f"{c}: r {show(d[c]['r'])}, permutation p {show(d[c]['p_perm'], '.2g')}, {d[c]['n']} entries "
                     f"({d[c]['units']}) over {d[c]['n_seeds']} seed(s)" for c in ("mlp", "heads"))


# --- the table ------------------------------------------------------------------------------------------------

CLAIMS = [fig2_claim(hop) for hop in HOPS] + [
    Claim("fig3", "Fig. 3 localization", paper.FIG3_CLAIM, fig3_data,
          lambda d: hop_conditions(d["res"]),
          "(a) the layer centroid of the positive informative MLP score is lower for first than second hop and "
          "(b) its share at the last token smaller, both paired over seeds; (c) for each hop more than "
          f"{MOSTLY} of the positive downstream score (MLPs and heads) is in the last {1 - LATE:.0%} of layers "
          "at the last token; all: reproduced, some: partly", fig3_crit, fig3_evidence),
    Claim("table2_post", "Table 2 (post)", "freezing early layers harms first-hop OCR but not second-hop OCR, and "
          "vice versa for late layers (double dissociation)", table2_data(("Early", "Late")), table2_pre,
          f"(a) Early raises the first-hop impl rank >= {CLEAR} above None (paired) and the second-hop one by "
          f"<= {UNCHANGED}; (b) Late the reverse; both: reproduced, one: partly", table2_post_crit,
          table2_evidence(("Early", "Late"))),
    Claim("table2_pre", "Table 2 (pre)", "frozen before finetuning, the model stores the facts elsewhere, but this "
          "does not recover that hop's OCR", table2_data(("Early (pre)", "Late (pre)")), table2_pre,
          f"(a) Early (pre) learns the first-hop facts (<= {LEARNED}), raises the first-hop impl rank >= {CLEAR} "
          f"above None (paired) and the second-hop one by <= {UNCHANGED}; (b) Late (pre) the same with the hops "
          "swapped; both: reproduced, one: partly", table2_pre_crit, table2_evidence(("Early (pre)", "Late (pre)"))),
    Claim("fig4", "Fig. 4 data ordering", paper.FIG4_CLAIM, fig4_data, fig4_pre,
          f"(a) facts_first and (b) joint each end >= {CLEAR} below impl_first on the test implications (paired); "
          f"(c) every ordering still knows its train facts and implications (<= {LEARNED}) at the end of "
          "continued pretraining; all: reproduced, (a) or (b): partly", fig4_crit, fig4_evidence),
    Claim("table3", "Table 3 grafting", "grafting W_F,ImplF - W_F onto W_F' transfers the extractive structure "
          "(Impl F'), grafting W_ImplF - W transfers only the memorized Impl F", table3_data, table3_pre,
          f"(i) W_graft is >= {CLEAR} below W_F' on Impl F'; (ii) W~_graft >= {CLEAR} above W_graft on Impl F'; "
          f"(iii) W~_graft >= {CLEAR} below W_F' on Impl F; each paired; all: reproduced, (i): partly",
          table3_crit, table3_evidence),
] + [Claim(key, title, paper.FIG6_CLAIM, fig6_data(key), fig6_pre,
             f"Pearson r > 0 with permutation p < {ALPHA} (seeds pooled, shuffled within seed) over per position x "
             "layer MLP entries and over per position x layer x head entries; both: reproduced, one: partly",
             fig6_crit, fig6_evidence)
       for key, title in (("fig6", "Fig. 6 correlation"),
                          ("fig6_authors", "Fig. 6 correlation (authors' code)"))]


def assess(res, ids=None):
    """One dict per claim (those in `ids`, default all): id, title, wording, precondition (text), verdict,
    criterion, evidence."""
    out = []
    for c in CLAIMS if ids is None else [c for c in CLAIMS if c.id in ids]:
        row = {"id": c.id, "title": c.title, "wording": c.wording, "criterion": c.criterion_text}
        d = c.data(res)
        if d is None:
            out.append({**row, "verdict": "missing", "precondition": "—", "evidence": "stage failed or not run"})
            continue
        conds = c.precondition(d)
        failed = [t for t, ok in conds if ok is False]
        verdict = "inconclusive" if failed else c.criterion(d)
        pre = "; ".join(f"{t}: {'yes' if ok else 'unknown' if ok is None else 'NO'}" for t, ok in conds) or "none"
        out.append({**row, "verdict": verdict, "precondition": pre, "evidence": c.evidence(d)})
    return out


def verdicts(res):
    """(claim, verdict, criterion, evidence) per claim, as report.py has always returned them."""
    return [(f"{a['title']}: {a['wording']}", a["verdict"], a["criterion"], a["evidence"]) for a in assess(res)]
