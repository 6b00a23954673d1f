"""The report's figures from collect()'s results. Fig. 2 and Fig. 4: the mean over seeds with a band of ± one
standard error of the mean, the chance line, and the paper's numbers where its text gives them (Fig. 2: its
first and last points are Table 2 All and None). Fig. 3: the first seed's heatmaps from scores.py. Fig. 6: every
seed's entries, standardized within seed, with the pooled r and its permutation p (collect.fig6_pooled)."""
import json
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from paper_report import paper, sweep
from paper_report.claims import ALL_ORDERS, HOPS
from paper_report.render import _write
from paper_report.stats import show


def _band(ax, runs, key, x_of, **kw):
    """Mean over seeds with a ± standard error band (none for one seed); runs: records of the same length."""
    T = min(len(r) for r in runs)
    ys = np.array([[rec[key] for rec in run[:T]] for run in runs], dtype=np.float64)      # (seeds, evaluations)
    x = x_of(runs[0][:T])
    ax.plot(x, ys.mean(0), **kw)
    if len(runs) > 1:
        se = ys.std(0, ddof=1) / np.sqrt(len(runs))
        ax.fill_between(x, ys.mean(0) - se, ys.mean(0) + se, alpha=0.2, color=ax.lines[-1].get_color(), lw=0)


def _chance(ax):
    ax.axhline(paper.CHANCE, ls=":", color="grey", label=f"chance ({paper.CHANCE})")


def _legend_below(fig, ax, ncols):
    """The legend of `ax`'s curves under the panels (the figure's constrained layout makes room), off the data."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=ncols, fontsize=7)


def fig2(plt, res):
    runs = {h: [r for r in res["fig2"][h] if r] for h in HOPS}
    if not any(runs.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True, layout="constrained")
    for ax, hop in zip(axes, HOPS):
        if runs[hop]:
            ep = lambda run: [r["epoch"] for r in run]
            last = runs[hop][0][-1]["epoch"]
            for key, kind, marker in (("fact_mean_rank", "fact", "o"), ("impl_mean_rank", "impl", "s")):
                _band(ax, runs[hop], key, ep, marker=marker, ms=3, label=f"{kind}s (ours)")
                before, after = paper.FIG2[hop][kind]                    # Table 2 All and None
                ax.plot([0, last], [before, after], ls="none", marker=marker, mfc="none", ms=9,
                        color=ax.lines[-1].get_color(), label=f"{kind}s (paper, first and last point)")
        _chance(ax)
        ax.set(title=hop.replace("_", "-"), xlabel="epoch")
    axes[0].set(ylabel="mean rank")
    _legend_below(fig, max(axes, key=lambda a: len(a.lines)), ncols=3)
    fig.suptitle(f"mean over {len(res['seeds'])} seed(s), band ± 1 standard error", fontsize=8)
    return fig


def fig4(plt, res):
    runs = {o: [r for r in res["fig4"].get(o) or [] if r] for o in ALL_ORDERS}
    if not any(runs.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    for o, color in zip(ALL_ORDERS, ("C0", "C1", "C2", "C3")):
        if not runs[o]:
            continue
        pre = [[x for x in r if x["phase"].startswith("pretrain")] for r in runs[o]]
        ft = [[x for x in r if x["phase"] == "finetune"] for r in runs[o]]
        step = lambda run: list(range(len(run)))                      # evaluations in order, across phases
        ep = lambda run: [r["epoch"] for r in run]
        _band(axes[0], pre, "fact_mean_rank", step, color=color, label=f"{o}: facts")
        _band(axes[0], pre, "impl_mean_rank", step, color=color, ls="--", label=f"{o}: impls")
        if all(ft):
            _band(axes[1], ft, "fact_mean_rank", ep, color=color, label=f"{o}: facts")
            _band(axes[1], ft, "impl_mean_rank", ep, color=color, ls="--", label=f"{o}: impls")
    for ax, t in zip(axes, ("continued pretraining (train split)", "finetuning on test facts")):
        _chance(ax)
        ax.set(title=t, xlabel="evaluation (epochs, phases in order)" if ax is axes[0] else "epoch",
               ylabel="mean rank")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))       # whole evaluations and epochs
    _legend_below(fig, axes[0], ncols=5)
    fig.suptitle(f"mean over {len(res['seeds'])} seed(s), band ± 1 standard error; the paper's text gives no "
                 f"numbers for Fig. 4", fontsize=8)
    return fig


def fig6(plt, res):
    """Scatter of the pooled entries; None when no seed's graft results can be read."""
    f6 = res.get("fig6")
    runs = [(seed, json.loads(Path(p).read_text())["fig6"]) for seed, p in zip(res["seeds"], res.get("fig6_sources") or [])
            if p and Path(p).exists()]
    if not f6 or not runs:
        return None
    return fig6_scatter(plt, runs, f6)


def fig6_scatter(plt, runs, stats_):
    """Fig. 6: downstream against informative entries of each (seed, graft.py's fig6 dict) in `runs`, standardized
    within seed, titled with `stats_` {comp: {"r", "p_perm", "n"}} (pooled, or one seed's own)."""
    z = lambda v: (np.asarray(v, np.float64) - np.mean(v)) / (np.std(v) or 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), layout="constrained")
    for ax, comp in zip(axes, ("mlp", "heads")):
        for seed, g in runs:
            ax.scatter(z(g[comp]["downstream"]), z(g[comp]["informative"]), s=6, alpha=0.4, label=f"seed {seed}")
        x = stats_[comp]
        ax.set(xlabel="downstream score (W_F,ImplF -> + test facts), z within seed",
               ylabel="informative score (W_F' -> W_graft), z within seed",
               title=f"{'MLPs' if comp == 'mlp' else 'heads'} (position x layer{' x head' * (comp == 'heads')})\n"
                     f"r = {show(x['r'])}, permutation p = {show(x['p_perm'], '.2g')}, n = {x['n']:,} entries")
        ax.title.set_fontsize(8)
        ax.xaxis.label.set_fontsize(7)
        ax.yaxis.label.set_fontsize(7)
    _legend_below(fig, axes[0], ncols=len(runs))
    return fig


def make_figures(res, out):
    """Draw and write every figure into `out`; {figure key: file name} for the ones that exist."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, figs = Path(out), {}
    for key, draw in (("fig2", fig2), ("fig4", fig4), ("fig6", fig6), ("grid", sweep.heatmaps)):
        fig = draw(plt, res)
        if fig is not None:
            _write(out / f"{key}.png", fig)
            plt.close(fig)
            figs[key] = f"{key}.png"
    for hop in HOPS:
        png = res["fig3"][hop]["png"]
        if png and Path(png).exists():
            _write(out / f"fig3_{hop}.png", Path(png))
            figs[f"fig3_{hop}"] = f"fig3_{hop}.png"
    if "fig6" not in figs and res.get("fig6_png") and Path(res["fig6_png"]).exists():
        _write(out / "fig6.png", Path(res["fig6_png"]))                # graft.py's own scatter, one seed
        figs["fig6"] = "fig6.png"
    return figs
