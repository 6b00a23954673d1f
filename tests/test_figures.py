"""Every figure of the README's commands and of report.py, rendered from small stub data at its saved size, is
readable: no text on another text, none off the canvas, no tick label or title over another panel, and every legend
off the plotted data (train.py's ranks.png, scores.py's scores.png / Fig. 3, report.py's fig2, fig4, fig6 and grid;
graft.py's fig6.png is fig6_scatter too)."""
import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt                                    # noqa: E402
from matplotlib.text import Text                                   # noqa: E402

import report as R                                                 # noqa: E402
import scores                                                      # noqa: E402
import train                                                       # noqa: E402
from checkpoint_io.outputs import SAVE_DPI                         # noqa: E402
from paper_report import figures, sweep                            # noqa: E402
from test_sweep import stub_grid                                   # noqa: E402

SLACK = 1.0                                                        # pixels: rounding of the extents


def drawn_texts(fig):
    """The non-empty text artists a draw at the saved size puts on the canvas, with their window extents. Tick labels
    count only for the ticks drawn (an axis keeps Text objects for ticks outside its view limits; `_update_ticks` is
    matplotlib's own list of the ticks it draws)."""
    fig.set_dpi(SAVE_DPI)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    off = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            drawn = set(axis._update_ticks())
            off |= {lab for t in axis.get_major_ticks() + axis.get_minor_ticks() if t not in drawn
                    for lab in (t.label1, t.label2)}
    return [(t, t.get_window_extent(renderer)) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t not in off and (t.axes is None or t.axes.get_visible())]


def overlap(a, b):
    return min(a.x1, b.x1) - max(a.x0, b.x0) > SLACK and min(a.y1, b.y1) - max(a.y0, b.y0) > SLACK


def problems(fig):
    """What makes `fig` hard to read, as sentences (empty: readable)."""
    out, canvas = [], fig.bbox
    texts = drawn_texts(fig)
    for i, (t, box) in enumerate(texts):
        if box.x0 < -SLACK or box.y0 < -SLACK or box.x1 > canvas.x1 + SLACK or box.y1 > canvas.y1 + SLACK:
            out.append(f"{t.get_text()!r} leaves the canvas")
        for u, other in texts[i + 1:]:
            if overlap(box, other):
                out.append(f"{t.get_text()!r} overlaps {u.get_text()!r}")
        for ax in fig.axes:                                        # a label of one panel over another panel
            if ax is not t.axes and ax.get_visible() and overlap(box, ax.bbox):
                out.append(f"{t.get_text()!r} lies on the panel {ax.get_title() or ax.get_label()!r}")
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for leg in legends:
        box = leg.get_window_extent()
        out += [f"a legend lies on the panel {ax.get_title()!r}" for ax in fig.axes if overlap(box, ax.bbox)]
    plt.close(fig)
    return out


def test_the_check_sees_clipping_overlap_and_a_legend_on_the_data():
    fig, axes = plt.subplots(1, 2, figsize=(4, 2))
    axes[0].set_title("a title far too long for its narrow panel, running over the next one and off the canvas")
    axes[1].plot([0, 1], label="curve")
    axes[1].legend()
    found = " ".join(problems(fig))
    assert "leaves the canvas" in found and "lies on the panel" in found and "a legend lies on" in found
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlabel("epoch")
    ax.text(0.5, -0.12, "on the x label", transform=ax.transAxes)
    assert "overlaps" in " ".join(problems(fig))
    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    ax.set(title="fine", xlabel="x", ylabel="y")
    assert problems(fig) == []


# --- train.py: ranks.png (Fig. 2 of one run, Fig. 4's phases of a daxwug run) --------------------------------------

def records(phases, epochs=8):
    out = []
    for ph in phases:
        for e in range(epochs + 1):
            out.append({"phase": ph, "epoch": e, "loss": 1.0, "fact_mean_rank": 9.5 * (1 - e / epochs),
                        "impl_mean_rank": 9.5 - e / 2})
    return out


@pytest.mark.parametrize("phases, chance", [
    (["finetune"], {"facts": 9.5, "implications": 9.5}),
    (["pretrain_facts", "pretrain_impls", "finetune"], {"facts": 9.5, "implications": 9.5}),
    (["finetune"], {"facts": 4.5, "implications": 2.0})])            # a user dataset: other chance levels
def test_ranks_png(phases, chance):
    recs = records(phases)
    fig = train.ranks_figure(recs, "a_rather_long_user_dataset_name_from_a_json_file.json on smollm2-135m",
                             {ph: chance for ph in phases})
    assert problems(fig) == []
    fig = train.ranks_figure(recs, "first_hop on smollm2-135m", {ph: chance for ph in phases})
    ax = fig.axes[0]
    assert all(float(x).is_integer() for x in ax.get_xticks() if 0 <= x <= 8)    # whole epochs
    levels = sorted({round(line.get_ydata()[0], 2) for line in ax.lines if line.get_linestyle() == ":"})
    assert levels == sorted({chance["facts"], chance["implications"]})            # the chance line(s)
    assert "/" not in fig._suptitle.get_text()                                   # no machine path
    plt.close(fig)


# --- scores.py: scores.png (Fig. 3) ---------------------------------------------------------------------------

@pytest.mark.parametrize("Ta", [5, 14, 24])
def test_scores_png(Ta):
    L, H = 30, 9
    g = torch.Generator().manual_seed(0)
    sc = {}
    for kind, scale in (("downstream", 2.4), ("informative", 0.009), ("upstream", 0.3)):
        sc[f"{kind}.mlp"] = scale * torch.randn(Ta, L, generator=g)
        sc[f"{kind}.attn"] = scale * torch.randn(Ta, L, H, generator=g) / H
    tokens = ["The", " people", " in", " the", " city", " K", "asia", " Kest", "rel", "le", " is", " from",
              " speak"] * 2
    fig = scores.figure(sc, tokens[:Ta], "first_hop: first_hop implications")
    cbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(cbars) == 3 and all("change of R" in ax.get_ylabel() for ax in cbars)   # one a row, with its unit
    images = [ax.images[0] for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    for kind in range(3):                                          # one colour scale within each score kind
        assert images[2 * kind].get_clim() == images[2 * kind + 1].get_clim()
    assert problems(fig) == []
    plt.close(fig)
    two = {k: v for k, v in sc.items() if not k.startswith("upstream")}       # scores.py --no-upstream
    fig = scores.figure(two, tokens[:Ta], "first_hop: first_hop implications")
    assert [ax.get_title() for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"] == \
        ["downstream: MLP", "downstream: attention (heads summed)", "informative: MLP",
         "informative: attention (heads summed)"]
    assert problems(fig) == []
    assert [line.split(":")[0] for line in scores.top_components(two, tokens[:Ta])] == ["informative", "downstream"]


# --- report.py: fig2, fig4, fig6, grid -----------------------------------------------------------------------------

@pytest.fixture
def report_results(tmp_path, stubs):
    work = tmp_path / "work"
    for seed in (0, 1, 2):
        w = work / f"seed{seed}"
        stubs.stub_seed(w, first_impl=1.0 + seed)
        stubs.write(w / "daxwug_facts_first_replay" / "metrics.json",
                    {"records": stubs.records(["pretrain_facts", "pretrain_impls"], 0.0, 0.0, epochs=8)
                     + stubs.records(["finetune"], 0.0, 1.5, epochs=8)})
    stub_grid(stubs, work, [0, 1, 2])
    return R.collect("stub-model", [0, 1, 2], work)


def test_fig2_png(report_results):
    assert problems(figures.fig2(plt, report_results)) == []


def test_fig4_png(report_results):
    fig = figures.fig4(plt, report_results)
    assert fig.legends and not any(ax.get_legend() for ax in fig.axes)    # the legend beside the curves
    assert problems(fig) == []


def test_fig6_png(report_results):
    g = np.random.default_rng(0)
    runs = [(s, {c: {"downstream": g.normal(size=n).tolist(), "informative": g.normal(size=n).tolist()}
                 for c, n in (("mlp", 960), ("heads", 8640))}) for s in (0, 1, 2)]
    stats_ = {"mlp": {"r": -0.031, "p_perm": 0.29, "n": 960}, "heads": {"r": -0.048, "p_perm": 0.0005, "n": 8640}}
    fig = figures.fig6_scatter(plt, runs, stats_)
    assert "8,640" in " ".join(t.get_text() for t, _ in drawn_texts(fig))
    assert problems(fig) == []


def test_grid_png(report_results):
    assert report_results["grid"] is not None
    assert problems(sweep.heatmaps(plt, report_results)) == []

