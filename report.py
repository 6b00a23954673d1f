"""Every table and figure of the paper for one model, side by side with the paper's OLMo-7B, in REPORT.md.

    python report.py [--model smollm2-135m] [--seeds N] [--out results/<model>] [--work runs/report/<model>]
    torchrun --nproc_per_node N report.py --model owner/name --revision R     # the same, the training sharded

Stages, per seed s, each a directory or file under --work/seed{s}, run in this process from one loaded base model
(train.run, scores.run, graft.experiment), and skipped when their output already exists (a failed stage is
recorded and the rest go on). Under torchrun every rank runs every stage: the training stages load their model
sharded over the ranks (run_setup/dist.py) instead of copying a loaded base, which is never kept; the evaluations
(the preconditions, salience, freeze_post, Table 3) run on models sharded the same way (dist.load), every rank on
every prompt, the same numbers as one process; scores.run and Fig. 6 shard W and W' and share the prompts out; rank 0
alone logs and writes, and after every stage the ranks agree on whether it worked (dist.agree) before the next one:
    first_hop, second_hop          train.run: Fig. 2; Table 2 None (last epoch) and All (epoch 0: the base)
    scores_first_hop, _second_hop  scores.run on those finetunes: Fig. 3 (eq. 6's upstream scores at the first seed
                                   only: REPORT.md reads the informative and downstream ones and draws that seed's)
    freeze_post_{hop}.json         Table 2 Early / Late: the plain finetune with its early / late layers reset to
                                   the base, which is what `train.py --freeze X --freeze-when post` computes
                                   (it trains the same model with the same seed first): no second training
    {hop}_{early,late}_pre         train.py --freeze X --freeze-when pre: Table 2 Early (pre) / Late (pre)
    graft                          graft.experiment: Table 3, Fig. 6, and Fig. 4's facts-first ordering
    daxwug_impl_first              Fig. 4: graft's W_ImplF, then train facts, then test facts (graft.ordering)
    daxwug_joint                   train.py --dataset daxwug --order joint: Fig. 4 (a group of its own, run last:
                                   plan)
    daxwug_facts_first_replay      Fig. 4's facts-first with the facts replayed in the implication phase, the control
                                   for forgetting F (beyond the paper): graft's W_F, then Impl F + F, then test facts
    preconditions.json             preconditions.base_knowledge: does the base model know the hops the claims need
    salience.json                  preconditions.salience: per implication, the base model's knowledge of the known
                                   hop against the finetune's rank (Ghosal et al., beyond the paper)
    exact_first_hop                seed 0, one process only: exact.run, eqs. 1-3 by real interventions against
                                   the linearized scores, with the full and a scaled ablation, and the sum identity
With --grid, each seed's lr x epochs cells follow its stages, then Fig. 4, Table 3 and Fig. 6 again at the grid's
gentlest cell (paper_report/sweep.py).
Then collect.collect() reads those outputs into results.json (every number per seed), paper_report/claims.py judges
each claim on the seed means, and render.render() (a pure function of the results) writes REPORT.md.
"""
import dataclasses
import gc
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch

from run_setup import cli
import data
from run_setup import dist
from run_setup import workers as workers_
from run_setup.progress import estimate
from run_setup.workers import Item
from run_setup.precision import cpu_isa, cpu_name
import exact
import graft
from paper_report import preconditions
import scores
from paper_report import sweep
import train
from checkpoint_io.checkpoint import DEFAULT_NAME, from_pretrained, load_config, load_tokenizer, resolve
from checkpoint_io.outputs import UserError, atomic_dir, check_output, work_dir, write_atomic, write_json
from paper_report import claims                                    # noqa: F401 (report.claims, for tests)
from paper_report.claims import HOPS, verdicts                     # noqa: F401 (report.verdicts, re-exported)
from paper_report.collect import collect, read_json
from paper_report.figures import make_figures
from paper_report.render import render


def log(msg):
    if dist.is_main():                                            # under torchrun rank 0 speaks for all
        print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- stages ------------------------------------------------------------------------------------------------

def freeze_post(model, ckpt, hop, seed, out, device):
    """Table 2 "post": the finetune `ckpt` with the early or late layers reset to the base `model`, evaluated."""
    ds = data.load_dataset(hop, seed=seed)
    base = resolve(model)
    tok = load_tokenizer(base)
    res = {}
    for which in ("early", "late"):
        m = dist.load(ckpt, device)
        m.source = base                         # train.reset_layers copies from model.source: the base W
        layers = train.split_layers(m.config.n_layers, which)
        train.reset_layers(m, layers)
        res[which] = {"layers": layers, "fact_mean_rank": data.mean_rank(m, tok, ds["facts"]),
                      "impl_mean_rank": data.mean_rank(m, tok, ds["implications"])}
        log(f"{hop} reset {which} layers {layers[0]}..{layers[-1]}: fact {res[which]['fact_mean_rank']:.2f} "
            f"impl {res[which]['impl_mean_rank']:.2f}")
    dist.on_main(write_json, out, res)


def finetune_stage(base, s: train.Settings):
    """train.py with settings `s`, in this process: from a copy of the loaded base model (base()), or under torchrun
    from the base loaded sharded (dist.fresh_copy)."""
    model, metrics = train.run(s, log=log, model=dist.fresh_copy(base))
    train.save(model, s.out, metrics, log=log)


def of_base(base, out, measure, *args):
    """measure(base model, its tokenizer, *args) (paper_report/preconditions.py) into the JSON file `out`: under
    torchrun on every rank (the same numbers), written by rank 0."""
    m = base()
    dist.on_main(write_json, out, measure(m, load_tokenizer(m.source), *args))


def stages(model, seed, w, base, device, upstream=True):
    """(name, output that marks it done, action) for one seed, cheapest first. `base()`: the base model, loaded
    once when a stage first needs it; `upstream`: the scores stages compute eq. 6's upstream scores too."""
    s = graft.work_settings(model, seed, device)
    fine = lambda out, **kw: (lambda: finetune_stage(base, dataclasses.replace(s, out=str(out), **kw)))
    out = [("preconditions", w / "preconditions.json",
            lambda: of_base(base, w / "preconditions.json", preconditions.base_knowledge, seed))]
    for hop in HOPS:
        out.append((hop, w / hop / "metrics.json", fine(w / hop, dataset=hop)))
        out.append((f"scores_{hop}", w / f"scores_{hop}" / "scores.safetensors",
                    lambda hop=hop: scores.run(model, w / hop, w / f"scores_{hop}", device=device, log=log,
                                               kinds=scores.KINDS if upstream else ("informative", "downstream"))))
        out.append((f"freeze_post_{hop}", w / f"freeze_post_{hop}.json",
                    lambda hop=hop: freeze_post(model, w / hop, hop, seed, w / f"freeze_post_{hop}.json", device)))
        for which in ("early", "late"):
            d = w / f"{hop}_{which}_pre"
            out.append((d.name, d / "metrics.json",            # Table 2 reads its last ranks only
                        fine(d, dataset=hop, freeze=which, freeze_when="pre", eval="final")))
    out.append(("salience", w / "salience.json", lambda: of_base(
        base, w / "salience.json", preconditions.salience, {hop: w / hop for hop in HOPS}, seed, device)))
    # eqs. 1-3 by real interventions, on 4 prompts: about 20 min here, so one seed; one process only (exact.py
    # intervenes on whole blocks, and its hours on a big model would outlast the process group's timeout)
    if seed == 0 and dist.launched() == 1:
        out.append(("exact_first_hop", w / "exact_first_hop" / "exact.json", lambda: exact.run(
            model, w / "first_hop", w / "exact_first_hop", device=device, log=log)))
    return out + graft_and_orderings(model, s, w, base, device)     # the joint ordering: an item of its own


def graft_and_orderings(model, s: train.Settings, w, base, device, prefix=""):
    """(name, output, action) of the graft experiment (Table 3, Fig. 6, Fig. 4's facts-first) and the Fig. 4
    orderings that start from its stages, under `w`, trained with `s`'s lr, epochs, schedule and evaluation; stage
    names start with `prefix`. The joint ordering, which starts from the base, is joint_stage's."""
    return [(prefix + "graft", w / "graft" / "results.json", lambda: graft.experiment(
                model, s.seed, w / "graft", device, log, load_base=base, lr=s.lr, epochs=s.epochs,
                schedule=s.schedule, eval=s.eval)),
            (prefix + "daxwug_impl_first", w / "daxwug_impl_first" / "metrics.json",
             lambda: graft.ordering("impl_first", s, w, log)),
            (prefix + "daxwug_facts_first_replay", w / "daxwug_facts_first_replay" / "metrics.json",
             lambda: graft.ordering("facts_first_replay", s, w, log))]


def joint_stage(s: train.Settings, w, base, prefix=""):
    """(name, output, action) of Fig. 4's joint ordering under `w` (train.py --dataset daxwug --order joint)."""
    return [(prefix + "daxwug_joint", w / "daxwug_joint" / "metrics.json",
             lambda: finetune_stage(base, dataclasses.replace(s, out=str(w / "daxwug_joint"), dataset="daxwug",
                                                              order="joint")))]


def cell_settings(s: train.Settings, cell, **kw):
    """`s` at the cell (lr, epochs), evaluated after each phase's last epoch only: at the premise and the gentle cell
    REPORT.md reads no other record (it draws no curve of them), and the weights are the same (tests/test_sweep.py)."""
    return dataclasses.replace(s, lr=cell[0], epochs=cell[1], eval="final", **kw)


def premise_stages(model, s: train.Settings, w, base, device, cell, joint=False):
    """(name, output, action) of one seed's Fig. 4 / Table 3 / Fig. 6 stages at the graft sweep's premise cell, at a
    constant rate as the sweep; `joint`: its joint ordering instead (an item of its own)."""
    s = cell_settings(s, cell, schedule="constant")
    w = sweep.premise_dir(w, cell)
    return joint_stage(s, w, base, "authors_") if joint else graft_and_orderings(model, s, w, base, device, "authors_")


def gentle_stages(model, s: train.Settings, w, base, device, cell):
    """(name, output, action) of one seed's Fig. 4 / Table 3 / Fig. 6 stages at the gentle cell (lr, epochs)."""
    s, w = cell_settings(s, cell), sweep.gentle_dir(w, cell)
    return graft_and_orderings(model, s, w, base, device, "gentle_") + joint_stage(s, w, base, "gentle_")


# --- the plan: which groups of stages run, in which order, on how many workers ------------------------------

def plan(seeds, grid=False, grid_only=False, every=None, graft_sweep=False):
    """The items of a run, in the order one process runs them (and workers take them up): Fig. 4's joint orderings,
    short and reading nothing but the base (premise_joint: and the sweep, for its cell), come last, where they fill
    in while the other worker ends a long item."""
    every = every or seeds
    items = [Item("sweep", every[0], lr) for lr in sweep.GRAFT_LRS] if graft_sweep and every[0] in seeds else []
    swept = tuple(i.key for i in items)
    for seed in seeds:
        items += [Item("seed", seed)] if not grid_only else []
        items += [Item("grid", seed)] if grid or grid_only else []
    if graft_sweep and not grid_only:
        items += [Item("premise", seed, after=swept + (("seed", seed, None),)) for seed in seeds]
    if grid and not grid_only:
        grids = tuple(i.key for i in items if i.kind == "grid")
        own = lambda seed: tuple(i.key for i in items if i.seed == seed and i.kind in ("seed", "premise"))
        items += [Item("gentle", seed, after=grids + own(seed)) for seed in seeds]
    if not grid_only:
        items += [Item("joint", seed) for seed in seeds]
        items += [Item("premise_joint", seed, after=swept) for seed in seeds] if graft_sweep else []
    return items


def run_item(model, work, device, item, every, base):
    """Run one item's stages that are not done yet (run_list). `every`: the report's seeds, on whose grids the
    gentle cell is chosen; `base()`: the base model (run_stages)."""
    seed, w = item.seed, work / f"seed{item.seed}"
    dist.on_main(work_dir, w, "report-work")
    s = graft.work_settings(model, seed, device)
    if item.kind == "sweep":                                      # the cells live beside seed{s}/graft_sweep
        dist.on_main(work_dir, w / "graft_sweep", "report-work")
        run_list(seed, w / "graft_sweep", graft.sweep_stages(s, w, base, log, lrs=(item.lr,)),
                 f"stage_times_lr{item.lr:g}.json")
    elif item.kind == "seed":
        run_list(seed, w, stages(model, seed, w, base, device, upstream=seed == every[0]))
    elif item.kind == "grid":
        run_list(seed, w / "grid", sweep.grid_stages(s, w, base, log))
    elif item.kind == "joint":                                    # its own times file: it runs beside the seed's
        run_list(seed, w, joint_stage(s, w, base), f"stage_times_{item.kind}.json")
    elif item.kind in ("premise", "premise_joint"):
        cell = sweep.premise_cell(sweep.collect_graft_sweep(work / f"seed{every[0]}"))
        if cell is None:
            return log(f"seed {seed}: the graft sweep is incomplete, or the premise holds at no cell: its premise "
                       "stages are skipped")
        log(f"seed {seed}: the graft sweep's premise cell is lr {cell[0]:g} x {cell[1]} epochs (constant rate)")
        joint = item.kind == "premise_joint"
        run_list(seed, w, premise_stages(model, s, w, base, device, cell, joint),
                 f"stage_times_{item.kind}.json" if joint else "stage_times.json")
    elif item.kind == "gentle":
        cell = sweep.gentlest(sweep.collect_grid(work, every), sweep.base_impl(work, every))
        if cell is None:
            return log(f"seed {seed}: the grid is incomplete, or no first-hop cell shows OCR: its gentle stages are "
                       "skipped")
        log(f"seed {seed}: the grid's gentle cell is lr {cell[0]:g} x {cell[1]} epochs")
        run_list(seed, w, gentle_stages(model, s, w, base, device, cell))


def run_stages(model, seeds, work, device="cpu", grid=False, grid_only=False, all_seeds=None, graft_sweep=False,
               workers=1, threads=None):
    """Run what is not done yet; every stage's time, status and error go to seed{s}/stage_times.json (the grid's
    to seed{s}/grid/stage_times.json, so that `--grid-only` in a second process never writes the same file; the
    sweep's, one file per lr, under seed{s}/graft_sweep; the joint orderings', seed{s}/stage_times_*joint.json). The
    gentle cell is chosen on the grids of `all_seeds` (default `seeds`: `--only-seeds` runs some of the report's
    seeds). Under torchrun every rank calls it (module docstring). `workers` > 1: plan()'s items on that many
    processes sharing `threads` (run_setup/workers.py)."""
    device = dist.init(device)                                    # torchrun: join the process group, if not yet
    if dist.world_size() > 1:                                     # before any stage: as many ranks as blocks at most
        if workers > 1:
            raise UserError("--workers runs processes of its own: under torchrun leave it at 1")
        dist.check_layers(load_config(resolve(model)).n_layers, "report.py")
    every, t0 = all_seeds or seeds, time.time()
    items = plan(seeds, grid, grid_only, every, graft_sweep)
    if workers == 1:
        if dist.world_size() == 1:                                # torchrun's ranks are the parallelism there
            workers_.suggest(len(items), threads or torch.get_num_threads(), device, log)
        base = base_loader(model, device)
        for item in items:
            run_item(model, work, device, item, every, base)
    else:
        workers_.run_parallel(partial(_worker_run, model, work, device, every), items, workers,
                              threads or torch.get_num_threads(), log)
    log(f"stages: {len(items)} groups ran in {time.time() - t0:.0f} s on {workers} worker(s)")


def base_loader(model, device):
    """base(): the base model. One process: loaded once, and each training stage trains a copy of it. Torchrun:
    loaded sharded for each evaluation stage that asks and freed after it (the training stages load their own)."""
    loaded = []

    def base():
        if dist.world_size() > 1:
            return dist.load(model, device)
        if not loaded:
            loaded.append(from_pretrained(model, device=device))
        return loaded[0]
    return base


_WORKER_BASE = []     # in a worker process: its base_loader, so that it loads the base once for all its items


def _worker_run(model, work, device, every, item):
    """run_item in a worker (run_setup/workers.py)."""
    if not _WORKER_BASE:
        _WORKER_BASE.append(base_loader(model, device))
    run_item(model, work, device, item, every, _WORKER_BASE[0])


def run_list(seed, w, todo, times_name="stage_times.json"):
    """Run each (name, done marker, action) of `todo` whose marker does not exist yet, timing it in
    w/`times_name`. Under torchrun the ranks agree after each stage whether it worked on all of them
    (dist.agree), so a stage that failed on one rank is recorded as failed and every rank goes on to the next stage
    together."""
    times_file = w / times_name
    times = read_json(times_file) or {}
    pending, ran, t_start = sum(not d.exists() for _, d, _ in todo), 0, time.time()
    for i, (name, done, action) in enumerate(todo, 1):
        if done.exists():
            if times.get(name, {}).get("status") in (None, "failed"):     # finished outside this tool
                times[name] = {"status": "reused", "seconds": None}
            continue
        log(f"seed {seed} stage {i}/{len(todo)} {name}: running (this seed's {pending} stages to run: "
            f"{estimate(ran, pending, time.time() - t_start)} at the mean pace so far)")
        ran += 1
        t0, load, error = time.time(), os.getloadavg()[0], None
        try:
            action()
        except Exception as e:                 # report it and go on: finished stages stay as they are
            error = e
        failed = dist.agree(error)             # torchrun: whether it failed on any rank; one process: error's text
        if failed is None:
            times[name] = {"status": "ok", "seconds": round(time.time() - t0, 1), "load_at_start": load}
            log(f"seed {seed} {name}: done in {time.time() - t0:.0f} s")
        else:
            times[name] = {"status": "failed", "seconds": round(time.time() - t0, 1), "error": failed[:300]}
            log(f"seed {seed} {name}: FAILED: {type(error).__name__ + ': ' if error else ''}{failed}")
        gc.collect()                           # free the stage's models before the next one
        dist.on_main(write_json, times_file, times)
    log(f"seed {seed}: {len(todo)} stages, {sum(d.exists() for _, d, _ in todo)} done")


# --- the results: collect, claims and verdicts, REPORT.md (render), figures: all in paper_report/ ----------

def write_report(model, seeds, work, out, overwrite=False, revision=None):
    res = collect(model, seeds, work)
    res["revision"] = revision
    res["cpus"] = os.cpu_count()
    res["machine"] = (f"{cpu_name()} ({platform.machine()}; bf16 matrix instructions: {cpu_isa()}), "
                      f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    with atomic_dir(out, "report", overwrite, log=log) as tmp:      # REPORT.md, figures, results.json at once
        figs = make_figures(res, tmp)
        write_json(tmp / "results.json", res)
        (tmp / "REPORT.md").write_text(render(res, figs))
    return res


def rejudge(out):
    """REPORT.md again from `out`'s own results.json under the claims of this version, its figures kept: for a
    report whose stage outputs are gone (results/ as committed). Its stages ran as results.json records them."""
    res = read_json(Path(out) / "results.json")
    if not res:
        raise UserError(f"{out} has no results.json of a report: run `report.py` to make one")
    res["rejudged"] = time.strftime("%Y-%m-%d")
    figs = {p.stem: p.name for p in Path(out).glob("*.png")}
    write_atomic(Path(out) / "REPORT.md", render(res, figs))
    return res


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", default=DEFAULT_NAME, help="base model: the embedded default, a directory or a hub id")
    cli.revision_flag(p)
    p.add_argument("--seeds", type=cli.positive_int, default=3, help="repeat every stage over seeds 0..N-1 (the "
                   "verdicts are on the seed means, with paired tests across seeds)")
    p.add_argument("--out", default=None, help="where REPORT.md, its figures and results.json go "
                                               "(default results/<model name>)")
    p.add_argument("--work", default=None, help="stage outputs, checkpoints included (default runs/report/<model name>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a report of ours")
    p.add_argument("--render-only", action="store_true", help="only rebuild REPORT.md from finished stages")
    p.add_argument("--rejudge", action="store_true", help="only rebuild --out's REPORT.md from its own results.json "
                   "under this version's claims, when its stage outputs are gone (e.g. results/ as committed)")
    p.add_argument("--grid", action="store_true", help="also the lr x epochs grid, and Fig. 4 / Table 3 / Fig. 6 at "
                   "its gentlest cell (paper_report/sweep.py)")
    p.add_argument("--grid-only", action="store_true", help="run only the grid's cells and write no report (e.g. in "
                   "a second process beside `report.py`; a later `report.py --grid` reuses them)")
    p.add_argument("--graft-sweep", action="store_true", help="also the graft sweep (seed 0, constant rate: the "
                   "authors' protocol) and Fig. 4 / Table 3 / Fig. 6 at its first cell where W_F,ImplF still knows F "
                   "and W_F' knows F' (paper_report/sweep.py)")
    p.add_argument("--only-seeds", type=cli.seed_list, default=None, metavar="S,S,...",
                   help="run only these seeds' stages (with --grid: their cells, and their gentle-cell stages once "
                        "every seed's grid is done) and write no report (e.g. one process a seed, each with "
                        "--threads 1; a later `report.py --render-only` writes the report)")
    p.add_argument("--workers", type=cli.positive_int, default=1, help="run the independent groups of stages (the "
                   "graft sweep's lrs, each seed's stages) in this many processes, --threads shared among them: on "
                   "a 2-core CPU two single-thread finetunes of SmolLM2 side by side took 71 s, one with two threads "
                   "66 s; one process only, not under torchrun")
    p.add_argument("--device", type=cli.device_name, default=cli.default_device(), help="torch device")
    cli.threads_flag(p)
    args = p.parse_args(argv)
    if args.only_seeds and not set(args.only_seeds) <= set(range(args.seeds)):
        p.error(f"--only-seeds {','.join(map(str, args.only_seeds))}: the report's seeds are 0..{args.seeds - 1} "
                f"(--seeds {args.seeds})")
    name = Path(str(args.model)).name
    out = Path(args.out or Path("results") / name)
    work = Path(args.work or Path("runs") / "report" / name)
    seeds = list(range(args.seeds))
    torch.set_num_threads(args.threads)

    def work_():
        t0 = time.time()
        if args.rejudge:
            for claim, v, _, ev in verdicts(rejudge(out)):
                log(f"{v:>10}  {claim}  [{ev}]")
            return log(f"rewrote {out}/REPORT.md from its results.json")
        device = dist.init(args.device)                            # torchrun: the process group, first
        # a hub id at --revision: its snapshot's directory, for every stage
        model = resolve(args.model, args.revision) if args.revision is not None else args.model
        partial = args.grid_only or args.only_seeds                # stages only, no report
        if not partial:                                            # before hours of stages, not after
            dist.on_main(check_output, out, "report", args.overwrite, log=log)
        if not args.render_only:
            run_stages(model, args.only_seeds or seeds, work, device, args.grid, args.grid_only, seeds,
                       args.graft_sweep, args.workers, args.threads)
        if partial:
            return log(f"stages done in {time.time() - t0:.0f} s; `report.py --render-only` (or --grid) writes the "
                       f"report")
        res = dist.on_main(write_report, args.model, seeds, work, out, args.overwrite, args.revision)
        if dist.is_main():
            for claim, v, _, ev in verdicts(res):
                log(f"{v:>10}  {claim}  [{ev}]")
        log(f"wrote {out}/REPORT.md in {time.time() - t0:.0f} s")
    try:
        return cli.run(work_)
    finally:
        dist.close()


if __name__ == "__main__":
    main()
