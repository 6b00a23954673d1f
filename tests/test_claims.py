"""paper_report/claims.py: every claim's verdict on stub results, for each of reproduced / partly / not / inconclusive
(and missing); paper_report/stats.py against references computed here independently; paper_report/preconditions.py's
prompts."""
import itertools
import json
import math

import numpy as np
import pytest

from paper_report import claims, paper, preconditions, stats

N = 3                                                              # seeds, as report.py's default


def recs(phase, fact, impl, start=9.5):
    """Two records of one phase: at chance, then at (fact, impl)."""
    return [{"phase": phase, "epoch": 0, "fact_mean_rank": start, "impl_mean_rank": start},
            {"phase": phase, "epoch": 1, "fact_mean_rank": fact, "impl_mean_rank": impl}]


def good():
    """Results of N seeds that reproduce every claim, with a little seed-to-seed spread."""
    t2 = {"None": ((0.0, 0.5), (0.0, 1.8)), "Early": ((5.0, 8.0), (1.0, 2.0)), "Late": ((0.0, 0.6), (0.1, 6.0)),
          "All": ((9.2, 9.3), (9.1, 9.5)), "Early (pre)": ((0.0, 6.5), (0.0, 1.0)),
          "Late (pre)": ((0.0, 0.5), (0.0, 6.6))}
    res = {"seeds": list(range(N)), "preconditions": [{"city_language": 0.5, "landmark_city": 1.0}] * N,
           "fig2": {h: [recs("finetune", 0.0, t2["None"][i][1] + 0.1 * s) for s in range(N)]
                    for i, h in enumerate(claims.HOPS)},
           "fig3": {"first_hop": {"stats": [{"inf_centroid": 0.3 + 0.01 * s, "inf_last": 0.1, "down_late_last": 0.7}
                                            for s in range(N)]},
                    "second_hop": {"stats": [{"inf_centroid": 0.8, "inf_last": 0.6 - 0.01 * s, "down_late_last": 0.6}
                                             for s in range(N)]}},
           "table2": {row: {h: {k: [v[i][j] + 0.05 * s for s in range(N)] for j, k in enumerate(("fact", "impl"))}
                            for i, h in enumerate(claims.HOPS)} for row, v in t2.items()},
           "fig4": {"facts_first": [recs("pretrain_facts", 0.0, 9.0) + recs("pretrain_impls", 0.0, 0.0)
                                    + recs("finetune", 0.0, 1.0 + 0.2 * s) for s in range(N)],
                    "impl_first": [recs("pretrain_impls", 9.0, 0.0) + recs("pretrain_facts", 0.0, 0.3)
                                   + recs("finetune", 0.0, 8.0 - 0.2 * s) for s in range(N)],
                    "joint": [recs("pretrain_joint", 0.0, 0.0) + recs("finetune", 0.0, 2.0) for s in range(N)]},
           "table3": {w: {c: [v + 0.05 * s for s in range(N)] for c, v in zip(paper.TABLE3_COLS, vals)}
                      for w, vals in paper.TABLE3.items()},
           "fig6": {c: {"r": 0.2, "p_perm": 0.001, "n": n, "units": "per position x layer", "n_seeds": N,
                        "per_seed_r": [0.2] * N} for c, n in (("mlp", 90), ("heads", 270))}}
    res["fig6_authors"] = json.loads(json.dumps(res["fig6"]))
    return res


def forget_f(r):
    """The graft chain (Fig. 4's facts_first) forgets the train facts F while it learns Impl F."""
    set_final(r["fig4"]["facts_first"], "pretrain_impls", "fact_mean_rank", 5.9)


def set_final(runs, phase, key, value):
    """Overwrite `key` of the final record of `phase` in every seed's records."""
    for run in runs:
        [r for r in run if r["phase"] == phase][-1][key] = value


def seeds(*xs):
    return list(xs)


# (claim id, expected verdict, what to change in good())
CASES = [
    ("fig2_first_hop", "reproduced", lambda r: None),
    ("fig2_first_hop", "partly", lambda r: set_final(r["fig2"]["first_hop"], "finetune", "impl_mean_rank", 8.5)),
    # a fall of 5.6 on the seed mean, but one seed rises: not consistent across seeds, so only partly
    ("fig2_first_hop", "partly", lambda r: [run[-1].update(impl_mean_rank=x)
                                           for run, x in zip(r["fig2"]["first_hop"], (1.0, 1.0, 9.8))]),
    ("fig2_first_hop", "not", lambda r: set_final(r["fig2"]["first_hop"], "finetune", "impl_mean_rank", 9.4)),
    ("fig2_first_hop", "inconclusive", lambda r: set_final(r["fig2"]["first_hop"], "finetune", "fact_mean_rank", 3.0)),
    ("fig2_first_hop", "inconclusive", lambda r: r.update(preconditions=[{"city_language": 5.0}] * N)),
    ("fig2_second_hop", "reproduced", lambda r: None),
    ("fig2_second_hop", "partly", lambda r: set_final(r["fig2"]["second_hop"], "finetune", "impl_mean_rank", 8.0)),
    ("fig2_second_hop", "not", lambda r: set_final(r["fig2"]["second_hop"], "finetune", "impl_mean_rank", 9.6)),
    ("fig2_second_hop", "inconclusive", lambda r: r.update(preconditions=[{"landmark_city": 4.0}] * N)),
    ("fig3", "reproduced", lambda r: None),
    ("fig3", "partly", lambda r: [s.update(down_late_last=0.2) for h in claims.HOPS for s in r["fig3"][h]["stats"]]),
    ("fig3", "not", lambda r: r["fig3"].update(                       # the hops swapped, downstream spread out
        first_hop={"stats": [{"inf_centroid": 0.8, "inf_last": 0.6, "down_late_last": 0.1}] * N},
        second_hop={"stats": [{"inf_centroid": 0.3, "inf_last": 0.1, "down_late_last": 0.1}] * N})),
    ("fig3", "inconclusive", lambda r: r["table2"]["None"]["second_hop"].update(fact=seeds(5.5, 5.0, 6.0))),
    ("table2_post", "reproduced", lambda r: None),
    # the case: the late-reset first hop rises by 3.10, so that half of the dissociation fails
    ("table2_post", "partly", lambda r: r["table2"]["Late"]["first_hop"].update(impl=seeds(3.6, 3.6, 3.6))),
    ("table2_post", "not", lambda r: [r["table2"][row].update(r["table2"]["None"]) for row in ("Early", "Late")]),
    ("table2_post", "inconclusive", lambda r: r["table2"]["None"]["second_hop"].update(fact=seeds(5.5, 5.5, 5.5))),
    ("table2_pre", "reproduced", lambda r: None),
    ("table2_pre", "partly", lambda r: r["table2"]["Late (pre)"]["second_hop"].update(impl=seeds(1.8, 1.9, 2.0))),
    ("table2_pre", "not", lambda r: [r["table2"][row].update(r["table2"]["None"])
                                     for row in ("Early (pre)", "Late (pre)")]),
    ("table2_pre", "inconclusive", lambda r: r.update(preconditions=[{"city_language": 5.0}] * N)),
    ("fig4", "reproduced", lambda r: None),
    # impl_first ends continued pretraining on the facts and forgets its implications: (c) fails
    ("fig4", "partly", lambda r: set_final(r["fig4"]["impl_first"], "pretrain_facts", "impl_mean_rank", 5.7)),
    ("fig4", "not", lambda r: set_final(r["fig4"]["impl_first"], "finetune", "impl_mean_rank", 1.5)),
    ("fig4", "inconclusive", lambda r: set_final(r["fig4"]["joint"], "finetune", "fact_mean_rank", 4.0)),
    # the mechanism's premise: facts_first forgets F in its implication phase (the case found on SmolLM2)
    ("fig4", "inconclusive", forget_f),
    ("table3", "reproduced", lambda r: None),
    ("table3", "partly", lambda r: r["table3"]["W~_graft"].update({"Impl F'": r["table3"]["W_graft"]["Impl F'"]})),
    ("table3", "not", lambda r: r["table3"]["W_graft"].update({"Impl F'": r["table3"]["W_F'"]["Impl F'"]})),
    ("table3", "inconclusive", lambda r: r["table3"]["W_F'"].update({"F'": seeds(5.0, 5.0, 5.0)})),
    ("table3", "inconclusive", forget_f),
    ("fig6", "reproduced", lambda r: None),
    ("fig6", "partly", lambda r: r["fig6"]["heads"].update(p_perm=0.3)),
    ("fig6", "not", lambda r: [r["fig6"][c].update(r=-0.2) for c in ("mlp", "heads")]),
    # one side's scores constant (e.g. every entry 0): r is undefined, which is no evidence of a correlation
    ("fig6", "partly", lambda r: r["fig6"]["heads"].update(r=None, p_perm=None)),
    ("fig6", "inconclusive", lambda r: set_final(r["fig4"]["facts_first"], "finetune", "fact_mean_rank", 5.0)),
    ("fig6", "inconclusive", forget_f),                   # the premise is Fig. 6's too: the graft update's
    ("fig6_authors", "inconclusive", forget_f),           # meaning rests on F known while Impl F was learned
    ("fig6_authors", "reproduced", lambda r: None),
    ("fig6_authors", "partly", lambda r: r["fig6_authors"]["mlp"].update(p_perm=0.3)),
    ("fig6_authors", "not", lambda r: [r["fig6_authors"][c].update(r=-0.2) for c in ("mlp", "heads")]),
    ("fig6_authors", "inconclusive", lambda r: set_final(r["fig4"]["facts_first"], "finetune", "fact_mean_rank",
                                                         5.0)),
]


def test_a_failed_premise_names_its_number():
    res = good()
    forget_f(res)
    for claim in ("fig4", "table3"):
        a = {x["id"]: x for x in claims.assess(res)}[claim]
        assert "the premise" in a["precondition"] and "rank 5.90" in a["precondition"] and \
            a["precondition"].count("NO") == 1, a["precondition"]
    # the other claims do not read the graft chain
    assert {x["id"]: x["verdict"] for x in claims.assess(res)}["fig2_first_hop"] == "reproduced"


@pytest.mark.parametrize("claim_id,expected,change", CASES)
def test_verdict(claim_id, expected, change):
    res = good()
    change(res)
    a = {x["id"]: x for x in claims.assess(res)}[claim_id]
    assert a["verdict"] == expected, a


def test_every_claim_has_every_verdict_case():
    ids = [c.id for c in claims.CLAIMS]
    assert set(ids) == {c for c, _, _ in CASES}
    for c in ids:
        assert {v for i, v, _ in CASES if i == c} == {"reproduced", "partly", "not", "inconclusive"}, c


def test_missing_stages_are_missing():
    res = good()
    res.update(fig2={h: [None] * N for h in claims.HOPS}, fig3={h: {"stats": [None] * N} for h in claims.HOPS},
               fig4={o: [None] * N for o in claims.ORDERS}, table3=None, fig6=None, fig6_authors=None)
    for row in res["table2"].values():
        for h in claims.HOPS:
            row[h] = {"fact": [None] * N, "impl": [None] * N}
    assert {x["verdict"] for x in claims.assess(res)} == {"missing"}


def test_unmeasured_base_knowledge_is_not_a_failure():
    res = good()
    res["preconditions"] = [None] * N
    a = {x["id"]: x for x in claims.assess(res)}
    assert a["fig2_second_hop"]["verdict"] == "reproduced" and "unknown" in a["fig2_second_hop"]["precondition"]


# --- stats against independent references -------------------------------------------------------------------

def test_mean_se_by_hand():
    assert stats.mean_se([1.0, None, 2.0, 3.0]) == (2.0, pytest.approx(1 / math.sqrt(3)), 3)   # sd 1, n 3
    assert stats.mean_se([4.0]) == (4.0, None, 1) and stats.mean_se([None]) == (None, None, 0)


def brute_sign_flip(d, two_sided):
    """Every sign pattern by bit mask, counted by hand."""
    obs, hits = sum(d) / len(d), 0
    for mask in range(2 ** len(d)):
        m = sum(x if (mask >> i) & 1 == 0 else -x for i, x in enumerate(d)) / len(d)
        hits += (abs(m) >= abs(obs) - 1e-12) if two_sided else (m >= obs - 1e-12)
    return hits / 2 ** len(d)


def test_sign_flip_against_brute_force():
    rng = np.random.default_rng(1)
    for n in (1, 3, 6, 9):
        d = list(rng.normal(0.5, 1.0, n))
        assert stats.sign_flip_p(d) == pytest.approx(brute_sign_flip(d, False))
        assert stats.sign_flip_p(d, "two-sided") == pytest.approx(brute_sign_flip(d, True))
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == 0.125                  # the floor for 3 seeds: 2^-3
    assert stats.sign_flip_p([1.0, -2.0, 3.0]) == 0.375                 # 3 of the 8 means reach 2/3
    d = list(range(1, 21))                                             # n 20: random sign patterns
    assert stats.sign_flip_p(d) == pytest.approx(1 / (1 + stats.N_PERM))
    assert claims.consistent(stats.paired([0, 0, 0], [1, 2, 3])) and not claims.consistent(stats.paired([0, 0, 0],
                                                                                                      [1, 2, -3]))


def test_pearson_against_numpy():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert stats.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_undefined_correlations_are_none_everywhere():
    """A constant variable has no Pearson r: every statistic says None (JSON has no NaN, and NaN > 0 is silently
    False), from the plain r to the pooled permutation test and the salience rho, and the text says '—'."""
    x, c = np.arange(10.0), np.ones(10)
    assert stats.pearson(x, c) is None and stats.pearson([1.0], [2.0]) is None
    assert stats.perm_pearson(c, x) == (None, None, 10) and stats.perm_pearson(x[:2], x[:2]) == (None, None, 2)
    f = stats.fig6_stats(x, c, strata=[0] * 5 + [1] * 5)
    assert f == {"r": None, "p_perm": None, "n": 10}
    json.dumps(f, allow_nan=False)
    assert stats.spearman_pooled(c, x, [0] * 10)[0] is None
    assert stats.show(None) == "—" and stats.show(0.25) == "+0.250" and stats.show(0.03, ".2g") == "0.03"


def exact_r(r, n, seed=0):
    """x and y with Pearson r exactly r: y = r z_x + sqrt(1 - r^2) z_e, e orthogonalized against x."""
    rng = np.random.default_rng(seed)
    x, e = rng.normal(size=n), rng.normal(size=n)
    x = (x - x.mean()) / x.std()
    e = e - e.mean() - (e @ x) / n * x
    e = e / e.std()
    return x, r * x + math.sqrt(1 - r * r) * e


def test_permutation_p_against_known_values():
    x = np.arange(20.0)
    r, p, n = stats.perm_pearson(x, 2 * x + 1)                         # perfectly correlated: no shuffle reaches it
    assert r == pytest.approx(1.0) and p == pytest.approx(1 / (1 + stats.N_PERM)) and n == 20
    # the t-table: with n = 30 (28 df) the two-sided 5% critical value of r is 0.361 (t 2.048)
    x, y = exact_r(0.361, 30)
    r, p, _ = stats.perm_pearson(x, y)
    assert r == pytest.approx(0.361) and abs(p - 0.05) < 0.015
    x, y = exact_r(0.0, 30)
    assert stats.perm_pearson(x, y)[1] > 0.9


def test_permutation_is_stratified_by_seed():
    # two seeds, no correlation within either, but seed 1 is shifted in both scores: pooled raw entries would
    # correlate strongly (r ~ 0.99), the stratified test must not
    x0, y0 = exact_r(0.0, 40, seed=3)
    x1, y1 = exact_r(0.0, 40, seed=4)
    x, y = np.r_[x0, x1 + 10], np.r_[y0, y1 + 10]
    assert stats.pearson(x, y) > 0.9
    f = stats.fig6_stats(x, y, strata=[0] * 40 + [1] * 40)
    assert abs(f["r"]) < 1e-9 and f["p_perm"] > 0.9 and f["n"] == 80
    # within-seed correlation survives: r is the mean of the two seeds' r
    x0, y0 = exact_r(0.5, 40, seed=3)
    x1, y1 = exact_r(0.3, 40, seed=4)
    f = stats.fig6_stats(np.r_[x0, 5 * x1], np.r_[y0, y1 - 3], strata=[0] * 40 + [1] * 40)
    assert f["r"] == pytest.approx(0.4) and f["p_perm"] < 0.01


# --- the base model's preconditions ----------------------------------------------------------------------------

def test_base_knowledge_asks_the_right_questions(monkeypatch):
    import data
    asked = {}
    monkeypatch.setattr(data, "mean_rank", lambda model, tok, ex: asked.setdefault(len(asked), ex) and len(asked))
    out = preconditions.base_knowledge(None, None, seed=0)
    ex = preconditions.known_hop_examples(0)
    assert set(ex) <= set(out) and all(len(v) == 20 for v in ex.values())
    assert data.Example("The people in the city of Tokyo speak", "Japanese") in ex["city_language"]
    assert data.Example("Eiffel Tower is in the city of", "Paris") in ex["landmark_city"]
    name, (city, lang, lm) = data.hop_pairs(0)[0]                     # the datasets' own pairing
    assert ex["in_context_first_hop"][0] == data.Example(
        f"{name} lives in {city}. The people in the city {name} is from speak", lang)
    assert ex["in_context_second_hop"][0].answer == name and lm in ex["in_context_second_hop"][0].prompt
    assert data.first_hop(0)["implications"][0].prompt in ex["in_context_first_hop"][0].prompt
