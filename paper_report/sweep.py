"""The learning-rate x epochs grid (the authors' sweep, Sec. 5.1 and their heatmaps) and the paper's data-ordering and
grafting experiments (Fig. 4, Table 3, Fig. 6) again at the grid's gentlest cell, where forgetting is least.

    python report.py --grid            # after the report's stages: the grid, then the gentle cell; one REPORT.md

For each hop, lr in LRS x epochs in EPOCHS x the report's seeds: train.run on a copy of the loaded base with
eval "final" (the ranks after the last epoch only: nothing else of a cell is reported) and no checkpoint, one
small JSON per cell under --work/seed{s}/grid/. A cell whose training diverges is recorded as diverged. The
report runs the seeds one after the other, so a grid cut short covers every cell with its first seeds.

The gentle cell: at lr 3e-4 x 8 epochs (the default), training W_F on Impl F makes it forget F, so Table 3's
W_graft carries unlearning of F. The authors' own rates are 10-100x lower. We take the first-hop cell with OCR
(facts learned, implications >= claims.CLEAR below the base model on every seed) at the smallest lr, then the
fewest epochs: the least update that still makes the structures Table 3 and Fig. 4 test, so the least to forget.
graft.experiment and the Fig. 4 orderings (with the facts-first ordering that replays the facts, data.phases)
run again there, under --work/seed{s}/gentle_lr{lr}_ep{epochs}/ (report.gentle_stages; named by the cell, so a grid
that chooses another cell never mixes with an earlier one).
"""
import dataclasses

from run_setup import dist
from paper_report import paper
import train
from paper_report.claims import HOPS, LEARNED, CLEAR, consistent, fmt, fmt_diff
from checkpoint_io.checkpoint import read_json
from checkpoint_io.outputs import write_json
from paper_report.stats import mean, paired

LRS = (3e-5, 1e-4, 3e-4, 1e-3)       # the authors swept {1e-6, 3e-6, 1e-5, 3e-5} for 7B models; ours is 135M
EPOCHS = (4, 8, 12, 16)              # the authors' epochs


def cell_name(hop, lr, epochs):
    return f"{hop}_lr{lr:g}_ep{epochs}"


def run_cell(base, s: train.Settings, path, log):
    """Train one cell from a copy of the loaded base (under torchrun: the base loaded sharded); write its final ranks
    (or that it diverged) to `path`, on rank 0."""
    out = {"hop": s.dataset, "lr": s.lr, "epochs": s.epochs, "seed": s.seed}
    path.parent.mkdir(parents=True, exist_ok=True)                  # inside the report's work directory
    try:
        _, metrics = train.run(s, log=lambda *_: None, model=dist.fresh_copy(base))
    except train.UserError as e:                                # divergence: a result of the cell, not a failure
        if "diverged" not in str(e):
            raise
        dist.on_main(write_json, path, {**out, "diverged": True, "error": str(e)})
        log(f"grid {cell_name(s.dataset, s.lr, s.epochs)} seed {s.seed}: diverged")
        return
    r = metrics["records"][-1]
    dist.on_main(write_json, path, {**out, "diverged": False, "loss": r["loss"], "fact_mean_rank": r["fact_mean_rank"],
                                    "impl_mean_rank": r["impl_mean_rank"], "seconds": round(metrics["wall_time_s"], 1)})
    log(f"grid {cell_name(s.dataset, s.lr, s.epochs)} seed {s.seed}: fact {r['fact_mean_rank']:.2f} "
        f"impl {r['impl_mean_rank']:.2f}")


def grid_stages(s: train.Settings, w, base, log):
    """(name, output, action) of one seed's grid cells; `s`: the report's settings for that seed."""
    out = []
    for hop in HOPS:
        for lr in LRS:
            for ep in EPOCHS:
                path = w / "grid" / f"{cell_name(hop, lr, ep)}.json"
                c = dataclasses.replace(s, dataset=hop, lr=lr, epochs=ep, eval="final")
                out.append((f"grid_{cell_name(hop, lr, ep)}", path,
                            lambda c=c, path=path: run_cell(base, c, path, log)))
    return out


def collect_grid(work, seeds):
    """{hop: {(lr, epochs) as "lr:epochs": {"fact": [per seed], "impl": [...], "diverged": [...]}}}, or None when
    no cell has run."""
    out, any_cell = {}, False
    for hop in HOPS:
        for lr in LRS:
            for ep in EPOCHS:
                c = {"fact": [], "impl": [], "diverged": []}
                for seed in seeds:
                    f = work / f"seed{seed}" / "grid" / f"{cell_name(hop, lr, ep)}.json"
                    r = read_json(f, "grid cell") if f.exists() else None
                    any_cell |= r is not None
                    ok = r is not None and not r["diverged"]
                    c["fact"].append(r["fact_mean_rank"] if ok else None)
                    c["impl"].append(r["impl_mean_rank"] if ok else None)
                    c["diverged"].append(None if r is None else r["diverged"])
                out.setdefault(hop, {})[f"{lr:g}:{ep}"] = c
    return out if any_cell else None


def complete(grid, hop, n_seeds):
    return grid is not None and all(len([x for x in c["diverged"] if x is not None]) == n_seeds
                                    for c in grid[hop].values())


def gentle_dir(w, cell):
    return w / f"gentle_lr{cell[0]:g}_ep{cell[1]}"


def judge(c, base_impl):
    """(learned, ocr, drop) of one cell {"fact", "impl"} (per seed): facts learned on the seed mean, and OCR: the
    implication rank >= CLEAR below the base model's (`base_impl`, per seed) on every seed (claims.consistent)."""
    f = mean(c["fact"])
    drop = paired(c["impl"], base_impl)                           # base - cell > 0: a fall
    learned = f is not None and f <= LEARNED and not any(c["diverged"])
    return learned, learned and bool(drop["n"]) and drop["diff"] >= CLEAR and consistent(drop), drop


def base_impl(work, seeds):
    """Per seed, the base model's first-hop implication rank: the first_hop stage's epoch-0 record."""
    out = []
    for seed in seeds:
        f = work / f"seed{seed}" / "first_hop" / "metrics.json"
        out.append(read_json(f, "first_hop metrics")["records"][0]["impl_mean_rank"] if f.exists() else None)
    return out


def gentlest(grid, base):
    """(lr, epochs) of the first-hop cell with OCR (facts learned and implications clearly better than the base
    model's `base` ranks, per seed) at the smallest lr, then the fewest epochs: Table 3 and Fig. 4 test the
    structures that make OCR, so the cell must show it. None until every first-hop cell has run on every seed, or
    when no cell shows OCR."""
    if not complete(grid, "first_hop", len(base)):
        return None
    for lr in LRS:
        for ep in EPOCHS:
            if judge(grid["first_hop"][f"{lr:g}:{ep}"], base)[1]:
                return lr, ep
    return None


# --- REPORT.md: heatmaps and the grid's section ----------------------------------------------------------

def heatmaps(plt, res):
    """Per hop, the seed-mean fact and implication ranks over lr x epochs (rows lr, columns epochs)."""
    import numpy as np
    grid = res.get("grid")
    if not grid:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(8.5, 7), sharey=True, layout="constrained")
    for row, hop in zip(axes, HOPS):
        for ax, kind in zip(row, ("fact", "impl")):
            cells = [[grid[hop][f"{lr:g}:{ep}"] for ep in EPOCHS] for lr in LRS]
            m = np.array([[np.nan if mean(c[kind]) is None else mean(c[kind]) for c in row_] for row_ in cells])
            im = ax.imshow(m, vmin=0, vmax=2 * paper.CHANCE, cmap="viridis_r")
            for i, row_ in enumerate(cells):
                for j, c in enumerate(row_):
                    text = ("div" if any(c["diverged"]) else "—") if np.isnan(m[i, j]) else f"{m[i, j]:.1f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8,
                            color="white" if np.isnan(m[i, j]) or m[i, j] > paper.CHANCE else "black")
            ax.set(xticks=range(len(EPOCHS)), xticklabels=EPOCHS, yticks=range(len(LRS)),
                   yticklabels=[f"{lr:g}" for lr in LRS], xlabel="epochs", ylabel="peak lr" if kind == "fact" else "",
                   title=f"{hop.replace('_', '-')}: {'facts' if kind == 'fact' else 'implications'}")
            ax.title.set_fontsize(9)
    fig.colorbar(im, ax=axes, shrink=0.6, label=f"mean rank (chance {paper.CHANCE})")
    fig.suptitle(f"mean over {len(res['seeds'])} seed(s)", fontsize=8)
    return fig


def grid_section(res, img):
    """The grid as tables (fact / impl per cell), where the facts are learned, and whether a cell shows OCR."""
    grid = res.get("grid")
    if not grid:
        return []
    n = len(res["seeds"])
    L = ["## Learning rate x epochs grid", "",
         f"Each cell: one finetune per seed at that peak lr and number of epochs (warmup and linear decay as "
         f"everywhere), ranks after the last epoch; fact / implication mean rank, seed mean (paper_report/sweep.py). "
         f"Learned: fact rank <= {LEARNED}. OCR: facts learned and the implication rank >= {CLEAR} below the "
         f"base model's (Table 2 All) on every seed (paired).", "", img("grid", "grid heatmaps"), ""]
    for hop in HOPS:
        base = res["table2"]["All"][hop]["impl"]
        L += [f"### {hop.replace('_', '-')} (base model's implication rank {fmt(base)})", "",
              "| lr \\ epochs | " + " | ".join(map(str, EPOCHS)) + " |", "|---" * (len(EPOCHS) + 1) + "|"]
        learned, ocr = [], []
        for lr in LRS:
            row = []
            for ep in EPOCHS:
                c = grid[hop][f"{lr:g}:{ep}"]
                if any(c["diverged"]):
                    row.append(f"diverged on {sum(bool(x) for x in c['diverged'])} seed(s)")
                    continue
                f, i = mean(c["fact"]), mean(c["impl"])
                if f is None:
                    row.append("—")
                    continue
                k = len([x for x in c["fact"] if x is not None])
                row.append(f"{f:.2f} / {i:.2f}" + (f" (n {k})" if k < n else ""))
                is_learned, is_ocr, drop = judge(c, base)
                if is_learned:
                    learned.append(f"{lr:g} x {ep}")
                if is_ocr:
                    ocr.append(f"{lr:g} x {ep} (fall {fmt_diff(drop)})")
            L.append(f"| {lr:g} | " + " | ".join(row) + " |")
        L += ["", f"Facts learned at: {', '.join(learned) or 'no cell'}. "
                  f"OCR at: {', '.join(ocr) or 'no cell'}.", ""]
    return L


# --- the graft sweep: where the mechanism's premise holds --------------------------------------------------------
#
# Table 3, Fig. 4 and Fig. 6 read the structures that training W_F on Impl F builds on top of the facts F: the paper's
# account needs F still known when Impl F is learned, else W_F,ImplF - W_F is "forget F + memorize Impl F". The
# sweep trains, on seed 0, the graft chain's first stages (W_F, W_F,ImplF, W_F') at a constant rate (the authors'
# protocol) for each cell of GRAFT_LRS x GRAFT_EPOCHS, and the premise cell is the first (smallest lr, then fewest
# epochs) where W_F,ImplF knows F and Impl F and W_F' knows F'. Table 3, Fig. 4 and Fig. 6 then run there on every
# seed, seed 0 reusing the sweep's stages (graft.sweep_stages and report.premise_stages). Nothing of a cell but
# its last ranks is reported, and nothing of the premise cell's stages but each phase's last: they evaluate after
# their last epoch only (eval "final"; a snapshot evaluates at its epoch), which changes no weight and no reported
# number (tests/test_sweep.py) and saves about a tenth of the report's stage time (bench/README.md).

GRAFT_LRS = (3e-5, 1e-4)             # constant; the authors' 1B sweep: {1e-6, 3e-6, 1e-5, 3e-5}
GRAFT_EPOCHS = (8, 16)


def premise_dir(w, cell):
    """The graft and orderings of the cell (lr, epochs) under one seed's work directory `w`."""
    return w / f"authors_lr{cell[0]:g}_ep{cell[1]}"


def collect_graft_sweep(w):
    """{"lr:epochs": {"F (W_F)", "Impl F (W_F,ImplF)", "F (W_F,ImplF)", "F' (W_F')"}} of the sweep under one seed's
    work directory `w` (None where a stage has not run), or None when no cell has."""
    out, any_cell = {}, False
    for lr in GRAFT_LRS:
        for ep in GRAFT_EPOCHS:
            g = premise_dir(w, (lr, ep)) / "graft"
            last = lambda name, key: read_json(g / name / "metrics.json")["records"][-1][key] \
                if (g / name / "metrics.json").exists() else None
            c = {"F (W_F)": last("W_F", "fact_mean_rank"),
                 "Impl F (W_F,ImplF)": last("W_F_ImplF", "fact_mean_rank"),     # that stage's "facts" are Impl F
                 "F (W_F,ImplF)": last("W_F_ImplF", "impl_mean_rank"),
                 "F' (W_F')": last("W_Fp", "fact_mean_rank")}
            any_cell |= any(v is not None for v in c.values())
            out[f"{lr:g}:{ep}"] = c
    return out if any_cell else None


def premise_holds(c):
    """W_F,ImplF knows F and Impl F, and W_F' knows F' (every rank <= LEARNED)."""
    keys = ("Impl F (W_F,ImplF)", "F (W_F,ImplF)", "F' (W_F')")
    return all(c[k] is not None and c[k] <= LEARNED for k in keys)


def premise_cell(sweep):
    """(lr, epochs) of the first cell (smallest lr, then fewest epochs) where the premise holds, else None."""
    for lr in GRAFT_LRS:
        for ep in GRAFT_EPOCHS:
            if sweep and premise_holds(sweep[f"{lr:g}:{ep}"]):
                return lr, ep
    return None


def graft_sweep_section(res):
    """The sweep as a table, and which cell the premise holds at."""
    sw = res.get("graft_sweep")
    if not sw:
        return []
    cols = ("F (W_F)", "Impl F (W_F,ImplF)", "F (W_F,ImplF)", "F' (W_F')")
    L = ["## Graft sweep: where the mechanism's premise holds", "",
         "Seed 0, constant rate (the authors' protocol), the graft chain's first stages at each lr x epochs "
         f"(paper_report/sweep.py). The premise of Table 3, Fig. 4 and Fig. 6: W_F,ImplF still knows F and has learned "
         f"Impl F, and W_F' knows F' (each mean rank <= {LEARNED}).", "",
         "| lr x epochs | " + " | ".join(cols) + " | premise |", "|---" * (len(cols) + 2) + "|"]
    for key, c in sw.items():
        lr, ep = key.split(":")
        L.append(f"| {lr} x {ep} | " + " | ".join("—" if c[k] is None else f"{c[k]:.2f}" for k in cols) +
                 f" | {'holds' if premise_holds(c) else 'no'} |")
    cell = premise_cell(sw)
    L += ["", f"Premise cell: lr {cell[0]:g} x {cell[1]} epochs." if cell else
          "No cell keeps F through the Impl F phase while learning F': on this model the premise fails at every "
          "cell swept, so Table 3, Fig. 4 and Fig. 6 cannot test the mechanism here.", ""]
    return L
