"""Weight grafting (paper Sec. 6.2): OUT = A + (B - C), and the Table 3 / Fig. 6 experiment built on it.

    python graft.py --out OUT --base A --add B --sub C    # a checkpoint directory that loads like any other
    python graft.py --experiment [--model M] [--seed S] [--out runs/graft]

The experiment, on the daxwug data of Sec. 6.1 (80 train names: facts F, implications Impl F; the same names
re-assigned to other cities: F', Impl F'; 20 test names):
    W_F          the base W trained on F
    W_F,ImplF    W_F then trained on Impl F (a fresh Adam)
    W_F'         W trained on F'
    W_ImplF      W trained on Impl F alone
    W_graft      W_F' + (W_F,ImplF - W_F)     should carry the extractive components, not the facts F
    W~_graft     W_F' + (W_ImplF - W)         control: should carry the implications Impl F themselves
Table 3: mean ranks on Impl F', Impl F and F'. Fig. 6: per component, downstream against informative scores.
Every stage is a directory under --out that is reused when the experiment runs again. In one process the stages
train (train.finetune) copies of one loaded base model. Under torchrun (`torchrun --nproc_per_node N graft.py
--experiment ...`) each stage loads its model sharded over the ranks (run_setup/dist.py) and saves it through
train.save; the weight arithmetic and every write run on rank 0 (dist.on_main), Table 3's ranks on a whole model
on every rank (the same numbers everywhere), Fig. 6's scores with a share of the prompts per rank (scores.score).
"""
import argparse
import copy
import dataclasses
import gc
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from run_setup import cli
import data
from run_setup import dist
import scores
import train
from checkpoint_io.checkpoint import (DEFAULT_NAME, UserError, check_finite, check_same_base, copy_side_files,
                                     from_pretrained, load_config, load_tokenizer, multimodal, open_shard, read_json,
                                     resolve, safetensors_files, text_keys)
from checkpoint_io.outputs import atomic_dir, check_output, save_figure, work_dir, write_json
from paper_report import sweep
from paper_report.paper import TABLE3 as PAPER_TABLE3, TABLE3_COLS
from paper_report.stats import fig6_stats, show


# --- weight arithmetic ------------------------------------------------------------------------------------

def _open_all(stack, path):
    """{shard file: {weight name: (open safetensors handle, stored key)}} over all shards of a checkpoint; a
    multimodal Gemma 3's text weights only, under our names (checkpoint.text_keys)."""
    mm, shards = multimodal(path), {}
    for f in safetensors_files(path):
        h = stack.enter_context(open_shard(f))
        shards[f] = {name: (h, key) for key, name in text_keys(h, mm)}
    return shards


def graft(base, add, sub, out, overwrite=False, log=print):
    """Write the checkpoint `base + (add - sub)` to `out`, tensor by tensor in fp32, atomically.
    Each result is a new tensor (no in-place update of live weights); output shards mirror the base's."""
    paths = [resolve(x) for x in (base, add, sub)]
    check_output(out, "checkpoint", overwrite, inputs=paths, log=log)     # before reading any weight
    check_same_base(paths)
    with atomic_dir(out, "checkpoint", overwrite, inputs=paths, log=log) as tmp:
        with ExitStack() as stack:
            shards = [_open_all(stack, p) for p in paths]
            where = [{k: hk for held in sh.values() for k, hk in held.items()} for sh in shards]   # name -> (h, key)
            names = [set(w) for w in where]
            for p, n in zip(paths[1:], names[1:]):
                if n != names[0]:
                    odd = sorted(n ^ names[0])[:3]
                    raise ValueError(f"{p} and {paths[0]} hold different weights (e.g. {odd}): graft only "
                                     "checkpoints finetuned from one base model")
            total, weight_map = 0, {}
            for shard, held in shards[0].items():
                if not held:                                      # a multimodal base's shard of vision weights
                    continue
                state = {}
                for k in held:
                    try:
                        a, b, c = (h.get_tensor(key) for h, key in (w[k] for w in where))
                    except Exception as e:                        # a truncated or corrupt shard
                        raise UserError(f"cannot read weight {k}: {e} (truncated or corrupt checkpoint?)") from None
                    for t, p in zip((a, b, c), paths):            # a NaN would make the graft NaN, unnoticed
                        check_finite(t, k, p)
                    if not (a.shape == b.shape == c.shape):
                        raise ValueError(f"{k}: shapes {tuple(a.shape)}, {tuple(b.shape)}, {tuple(c.shape)} differ")
                    # fp32 whatever the stored dtype: a bf16 update of 1e-6 would round away
                    state[k] = a.float() + (b.float() - c.float()) if a.is_floating_point() else a
                    total += state[k].numel() * state[k].element_size()
                save_file(state, str(tmp / shard.name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(state, shard.name))
        index = paths[0] / "model.safetensors.index.json"
        if index.exists():                                        # same shard layout, new (fp32) size and names
            idx = read_json(index, "shard index")
            idx.update(metadata={**idx.get("metadata", {}), "total_size": total}, weight_map=weight_map)
            (tmp / index.name).write_text(json.dumps(idx, indent=1))
        copy_side_files(paths[0], tmp)                            # config and tokenizer: the base's
        (tmp / "graft.json").write_text(json.dumps({"formula": "base + (add - sub), tensor by tensor in fp32",
                                                    "base": str(base), "add": str(add), "sub": str(sub),
                                                    "base_dir": str(paths[0].resolve())}, indent=1))   # provenance
    log(f"wrote {out} = {base} + ({add} - {sub})")
    return out


# --- the experiment: training stages ------------------------------------------------------------------------

def graft_or_reuse(base, add, sub, out, log=print):
    """graft(base, add, sub, out) unless `out` holds a finished graft already (its graft.json)."""
    if (Path(out) / "graft.json").exists():
        log(f"[graft] reuse {out}")
    else:
        graft(base, add, sub, out, log=log)


def train_stage(start, train_ex, other, out, s, log=print, snapshots=None, evals=None):
    """train.py's recipe (settings `s`) on the example list `train_ex`, starting from `start` (a loaded model, which
    is copied, or a checkpoint directory; under torchrun a directory, loaded sharded), saved as the checkpoint `out`
    (train.save); its records' "fact" rank is `train_ex`, its "impl" rank `other` (or `evals`' "facts" and
    "implications", data.phases' evaluation splits, where the training set is not the facts). A finished stage (its
    metrics.json) is reused. `snapshots`: {k: directory} of the same stage with k < s.epochs epochs at a constant
    rate, saved on the way (train.train_phase's snapshots: the same weights and records as a k-epoch run)."""
    out, snapshots = Path(out), {k: Path(d) for k, d in (snapshots or {}).items()}
    if (out / "metrics.json").exists():
        log(f"[graft] reuse {out}")
        return read_json(out / "metrics.json")
    for d in [out, *snapshots.values()]:
        dist.on_main(check_output, d, "checkpoint", s.overwrite, log=log)
    if dist.world_size() > 1:
        model = dist.load_sharded(start, s.device)                  # this rank's shards only
    else:
        model = copy.deepcopy(start) if isinstance(start, torch.nn.Module) else from_pretrained(start, device=s.device)
    log(f"[graft] train {out.name} from {model.source} on {len(train_ex)} examples")
    lr = s.lr or train.default_lr(s.model, sum(p.numel() for p in model.parameters()))   # s.model: the base's name
    s = dataclasses.replace(s, model=str(model.source), lr=lr,
                            dataset=f"{len(train_ex)} examples (graft stage {out.name})")
    torch.manual_seed(s.seed)
    t0 = time.time()
    phases = [("finetune", train_ex, evals or {"facts": train_ex, "implications": other})]

    def metrics(settings, records, facts, **extra):
        return {"args": dataclasses.asdict(settings), "base_model": str(model.source), **facts, **extra,
                "torch_threads": torch.get_num_threads(), "world_size": dist.world_size(),
                "wall_time_s": time.time() - t0, "records": records}

    def snapshot(k, d):
        def save(records, facts):
            if (d / "metrics.json").exists():                     # written by an earlier, interrupted run
                return
            log(f"[graft] {out.name}: its epoch {k} is the {k}-epoch stage {d}")
            sk = dataclasses.replace(s, epochs=k, dataset=f"{len(train_ex)} examples (graft stage {d.name})")
            train.save(model, d, metrics(sk, records, facts, snapshot_of=str(out)), s.overwrite, log=log)
        return save
    records, facts = train.finetune(model, load_tokenizer(model.source), phases, s, log,
                                    snapshots={k: snapshot(k, d) for k, d in snapshots.items()})
    m = metrics(s, records, facts)
    train.save(model, out, m, s.overwrite, log=log)
    del model
    gc.collect()
    return m


def swap(records):
    """Records of a stage that trained on implications: its "facts" were Impl F, its "implications" F."""
    return [{**r, "fact_mean_rank": r["impl_mean_rank"], "impl_mean_rank": r["fact_mean_rank"]} for r in records]


def per_entry(model_a, model_b, tok, examples, kind, mlp_kind=None):
    """Linearized `kind` scores (scores.py, eqs. 4-9; the MLPs' `mlp_kind`, default `kind`) averaged over prompts on
    the anchor's positions, in the authors' units: one entry per position x layer (MLPs, (Ta, L)) and position x
    layer x head (heads, (Ta, L, H))."""
    sc, _, _ = scores.score(model_a, model_b, tok, examples, log=lambda *_: None, kinds=(kind,))   # that one only
    return sc[f"{mlp_kind or kind}.mlp"], sc[f"{kind}.attn"]


def correlate(down, inf, seed, what, log):
    """Fig. 6's statistics: per component kind, Pearson r of the downstream against the informative entries (both
    (MLP table, head table) pairs from per_entry), with the permutation p."""
    fig6 = {}
    for comp, dn, inf_ in (("mlp", *right_aligned(down[0], inf[0])), ("heads", *right_aligned(down[1], inf[1]))):
        st = fig6_stats(dn.flatten().double().numpy(), inf_.flatten().double().numpy(), seed=seed)
        fig6[comp] = {"r": st["r"], "p": st["p_perm"], "n": st["n"], "shape": list(dn.shape),
                      "downstream": dn.flatten().tolist(), "informative": inf_.flatten().tolist()}
        log(f"[graft] {what} {comp}: r = {show(st['r'])}, p = {show(st['p_perm'], '.3g')} over {dn.numel()} entries")
    return fig6


def right_aligned(a, b):
    """Two (Ta, ...) tables of one template whose slot (the name) may span different numbers of tokens: their last
    min(Ta) positions, which hold the right-aligned slot and the shared suffix (scores.align)."""
    n = min(a.shape[0], b.shape[0])
    return a[-n:], b[-n:]


def scatter(fig6, seed, path):
    """This experiment's Fig. 6 (figures.fig6_scatter, as in REPORT.md for one seed) to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from paper_report.figures import fig6_scatter
    fig = fig6_scatter(plt, [(seed, fig6)], {c: {"r": v["r"], "p_perm": v["p"], "n": v["n"]} for c, v in fig6.items()})
    save_figure(fig, path)


def work_settings(model, seed, device, overwrite=False, lr=None, epochs=8, schedule="warmup_linear", eval="epochs"):
    """train.py's defaults for the experiment's stages (lr None: train.default_lr)."""
    return train.Settings(model=str(model), seed=seed, device=device, threads=torch.get_num_threads(),
                          overwrite=overwrite, lr=lr, epochs=epochs, schedule=schedule, eval=eval)


def experiment(model=DEFAULT_NAME, seed=0, out="runs/graft", device="cpu", log=print, load_base=None, lr=None,
               epochs=8, revision=None, schedule="warmup_linear", eval="epochs"):
    """Table 3 and Fig. 6 (Sec. 6.2) into the work directory `out`. `load_base()`: the base model, loaded (report.py's,
    loaded once for all its stages; default: loaded here); `lr`, `epochs`, `schedule`, `eval`: every stage's training
    (default: train.py's); `revision`: the hub id `model`'s. Under torchrun every rank calls it (module docstring)."""
    device = dist.init(device)                                    # torchrun: join the process group, if not yet
    log = dist.main_log(log)
    base = resolve(model, revision)                               # a wrong model or revision: before any write
    dist.check_layers(load_config(base).n_layers, "graft.py --experiment")
    out = Path(out)
    dist.on_main(work_dir, out, "graft-experiment")
    t0 = time.time()
    d = data.load_dataset("daxwug", seed=seed)
    F, IF, Fp, IFp = d["train_facts"], d["train_impls"], d["cf_facts"], d["cf_impls"]
    s = work_settings(model, seed, device, lr=lr, epochs=epochs, schedule=schedule, eval=eval)
    times = {}

    def timed(name, fn):
        t = time.time()
        r = fn()
        times[name] = round(time.time() - t, 1)
        return r

    stages = [n for n in ("W_F", "W_Fp", "W_ImplF") if not (out / n / "metrics.json").exists()]
    # one process: the base loaded once for the three stages that start from it; torchrun: its directory, from
    # which each stage loads its shards
    start = base if dist.world_size() > 1 or not stages else \
        load_base() if load_base is not None else from_pretrained(base, device=device)
    # the four trainings (Sec. 6.2), then the OCR finetune of W_F,ImplF on the test facts (for Fig. 6)
    m_f = timed("W_F", lambda: train_stage(start, F, IF, out / "W_F", s, log))
    m_fi = timed("W_F_ImplF", lambda: train_stage(out / "W_F", IF, F, out / "W_F_ImplF", s, log))
    # W_F' is read only at its end (Table 3, Fig. 6): ranks after the last epoch only
    timed("W_Fp", lambda: train_stage(start, Fp, IFp, out / "W_Fp", dataclasses.replace(s, eval="final"), log))
    timed("W_ImplF", lambda: train_stage(start, IF, F, out / "W_ImplF", s, log))
    m_ft = timed("W_F_ImplF_test", lambda: train_stage(out / "W_F_ImplF", d["test_facts"], d["test_impls"],
                                                        out / "W_F_ImplF_test", s, log))
    del start
    for name, args in (("W_graft", (out / "W_Fp", out / "W_F_ImplF", out / "W_F")),
                       ("W_graft_control", (out / "W_Fp", out / "W_ImplF", base))):
        # rank 0 alone looks and writes, the others wait for it: a rank that looked itself could find the graft
        # rank 0 had just written, skip the wait, and meet rank 0 at another collective
        timed(name, lambda: dist.on_main(graft_or_reuse, *args, out / name, log))

    # Table 3: mean ranks of W_F', W_graft, W~_graft (and the base for reference)
    t = time.time()
    tok = load_tokenizer(base)
    ranks = {}
    for label, ckpt in (("W (base)", base), ("W_F'", out / "W_Fp"), ("W_graft", out / "W_graft"),
                        ("W~_graft", out / "W_graft_control")):
        m = dist.load(ckpt, device)
        ranks[label] = {c: data.mean_rank(m, tok, ex) for c, ex in zip(TABLE3_COLS, (IFp, IF, Fp))}
        log(f"[graft] {label:9s} " + "  ".join(f"{c} {v:5.2f}" for c, v in ranks[label].items()))
        del m
    times["table3_eval"] = round(time.time() - t, 1)

    # Fig. 6, our reading of Sec. 6.2: "downstream components active in helping W_F,ImplF perform OCR when
    # finetuned on test facts" = downstream scores (eq. 5) of the update W = W_F,ImplF -> W' = W_F,ImplF finetuned
    # on the 20 test facts, on the test implications; "the informative score of the grafting update" =
    # informative scores (eq. 4) of W = W_F' -> W' = W_graft, on the counterfactual implications Impl F'. Both
    # averaged over prompts, entry by entry as the authors correlate them (position x layer for MLPs, position x
    # layer x head for heads); Pearson r over the entries, separately for MLPs and heads.
    t = time.time()
    load = lambda p: dist.load(p, device).requires_grad_(False)
    down = per_entry(load(out / "W_F_ImplF"), load(out / "W_F_ImplF_test"), tok, d["test_impls"], "downstream")
    inf = per_entry(load(out / "W_Fp"), load(out / "W_graft"), tok, IFp, "informative")
    fig6 = correlate(down, inf, seed, "Fig. 6", log)
    # Fig. 6 as the authors' code computes it: the informative scores of the update W_F -> W_F,ImplF, at W_F, on
    # Impl F, with an MLP's score from its down projection alone (the same downstream scores)
    inf_authors = per_entry(load(out / "W_F"), load(out / "W_F_ImplF"), tok, IF, "informative", "informative_down")
    fig6_authors = correlate(down, inf_authors, seed, "Fig. 6 (authors' code)", log)
    times["fig6_scores"] = round(time.time() - t, 1)

    # Fig. 4's facts-first ordering is this chain (W_F, W_F,ImplF, then the test facts): the same phases, seeds
    # and fresh optimizers as `train.py --order facts_first`, so report.py reuses it instead of training it again
    facts_first = [{**r, "phase": "pretrain_facts"} for r in m_f["records"]] + \
        [{**r, "phase": "pretrain_impls"} for r in swap(m_fi["records"])] + \
        [{**r, "phase": "finetune"} for r in m_ft["records"]]
    results = {"settings": {"model": str(model), "revision": revision, "base_dir": str(base), "seed": seed,
                            "dataset": "daxwug", "lr": s.lr, "epochs": s.epochs, "world_size": dist.world_size(),
                            "fig6_units": "entries: position x layer (MLPs), position x layer x head (heads)",
                            "pearson_p": "permutation test (stats.perm_pearson), two-sided"},
               "table3": ranks, "paper_table3": {k: dict(zip(TABLE3_COLS, v)) for k, v in PAPER_TABLE3.items()},
               "fig6": fig6, "fig6_authors": fig6_authors, "fig4_facts_first": facts_first, "stage_times_s": times,
               "wall_time_s": round(time.time() - t0, 1)}

    def write():                                                  # rank 0's, under torchrun
        scatter(fig6, seed, out / "fig6.png")
        write_json(out / "results.json", results)
    dist.on_main(write)
    log(f"[graft] wrote {out}/results.json, fig6.png ({results['wall_time_s']:.0f} s)")
    return results


# Fig. 4's orderings whose first phase is one of the experiment's stages: that stage, and whether its records need
# swap() (W_ImplF trained on Impl F, so its "facts" were the implications)
CHAINED_ORDERS = {"impl_first": ("W_ImplF", True), "facts_first_replay": ("W_F", False)}


def ordering(order, s, w, log=print):
    """Fig. 4's `order` (CHAINED_ORDERS) in the report's work directory `w`: the experiment's stage (w/graft) as the
    first phase, then data.phases' other phases, each a train_stage from the one before, under
    w/daxwug_{order}/{phase}: the phases, seed and fresh optimizers of `train.py --order order`, one training fewer."""
    first, swapped = CHAINED_ORDERS[order]
    g, out = w / "graft", w / f"daxwug_{order}"
    dist.on_main(work_dir, out, "report-stage")
    if not (g / first / "metrics.json").exists():
        raise RuntimeError(f"{g / first} is missing: the graft stage has to run first")
    (phase0, _, _), *rest = data.phases(data.load_dataset("daxwug", seed=s.seed), order)
    done = read_json(g / first / "metrics.json")["records"]
    records = [{**r, "phase": phase0} for r in (swap(done) if swapped else done)]
    built = [g / first]
    for phase, examples, evals in rest:
        m = train_stage(built[-1], examples, None, out / phase, s, log, evals=evals)
        records += [{**r, "phase": phase} for r in m["records"]]
        built.append(out / phase)
    dist.on_main(write_json, out / "metrics.json", {"order": order, "seed": s.seed, "records": records,
                                                    "built_from": [str(d) for d in built]})


def sweep_stages(s: train.Settings, w, base, log, lrs=None):
    """report.py's stages of the graft sweep (paper_report/sweep.py), seed s.seed, whose work directory is `w`: (name,
    output, action) of the graft chain's W_F, W_F,ImplF and W_F' at each cell, in the cell's graft/ directory, where
    experiment() reuses them, evaluated after their last epoch only (the sweep reads nothing else). At a constant
    rate a shorter cell's W_F and W_F' are the longest cell's after as many epochs (train.train_phase's snapshots):
    one W_F and one W_F' run per lr give every cell's."""
    d = data.load_dataset("daxwug", seed=s.seed)
    F, IF, Fp, IFp = d["train_facts"], d["train_impls"], d["cf_facts"], d["cf_impls"]
    longest, out = max(sweep.GRAFT_EPOCHS), []
    for lr in lrs or sweep.GRAFT_LRS:
        g = {ep: sweep.premise_dir(w, (lr, ep)) / "graft" for ep in sweep.GRAFT_EPOCHS}
        c = {ep: dataclasses.replace(s, lr=lr, epochs=ep, schedule="constant", eval="final")
             for ep in sweep.GRAFT_EPOCHS}

        def stage(start, ex, other, name, ep, snap=False, c=c, g=g):     # in the cell's directory
            for d in g.values():
                dist.on_main(work_dir, d, "graft-experiment")
            if callable(start):                                   # the base: torchrun loads it sharded, by name
                start = resolve(s.model) if dist.world_size() > 1 else start()
            shorter = {k: g[k] / name for k in g if k < ep} if snap else {}
            train_stage(start, ex, other, g[ep] / name, c[ep], log, snapshots=shorter)
        out += [(f"graft_sweep_lr{lr:g}_W_F", g[longest] / "W_F" / "metrics.json",
                 lambda st=stage: st(base, F, IF, "W_F", longest, snap=True)),
                (f"graft_sweep_lr{lr:g}_W_Fp", g[longest] / "W_Fp" / "metrics.json",
                 lambda st=stage: st(base, Fp, IFp, "W_Fp", longest, snap=True))]
        out += [(f"graft_sweep_lr{lr:g}_ep{ep}_W_F_ImplF", g[ep] / "W_F_ImplF" / "metrics.json",
                 lambda st=stage, g=g, ep=ep: st(g[ep] / "W_F", IF, F, "W_F_ImplF", ep))
                for ep in sweep.GRAFT_EPOCHS]
    return out


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("old_out", nargs="?", help=argparse.SUPPRESS)     # `graft.py OUT --base ...`, as before --out
    p.add_argument("--base", help="checkpoint A (its config.json and tokenizer.json are copied)")
    p.add_argument("--add", help="checkpoint B, added")
    p.add_argument("--sub", help="checkpoint C, subtracted")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a checkpoint of ours")
    p.add_argument("--experiment", action="store_true", help="run the Table 3 / Fig. 6 experiment on daxwug")
    p.add_argument("--model", default=DEFAULT_NAME, help="--experiment: the base model")
    cli.revision_flag(p)
    p.add_argument("--lr", type=cli.positive_float, default=None,
                   help="--experiment: every stage's peak learning rate (default: train.py's)")
    p.add_argument("--epochs", type=cli.positive_int, default=8, help="--experiment: epochs of every stage")
    p.add_argument("--seed", type=int, default=0, help="--experiment: dataset pairing and shuffling seed")
    p.add_argument("--out", help="the checkpoint directory of base + (add - sub); with --experiment its work "
                                 "directory (default there: runs/graft)")
    p.add_argument("--device", type=cli.device_name, default=cli.default_device(), help="--experiment: torch device")
    a = p.parse_args(argv)
    if a.old_out is not None and a.out is not None:
        p.error(f"the output is given twice ({a.old_out} and --out {a.out}): give --out only")
    a.out = a.out or a.old_out

    def work():
        if a.experiment:
            if a.base or a.add or a.sub:
                raise UserError("--experiment takes --model, --seed and --out, not --base/--add/--sub")
            return experiment(a.model, a.seed, a.out or "runs/graft", a.device, lr=a.lr, epochs=a.epochs,
                              revision=a.revision)
        if not (a.out and a.base and a.add and a.sub):
            raise UserError("give --out OUT --base A --add B --sub C (or --experiment)")
        if a.revision is not None:
            raise UserError("--revision is --experiment's (of its --model); --base, --add and --sub are directories")
        if dist.launched() > 1:
            raise UserError("graft.py OUT --base A --add B --sub C is weight arithmetic for one process: run it "
                            "without torchrun")
        return graft(a.base, a.add, a.sub, a.out, a.overwrite)
    try:
        return cli.run(work)
    finally:
        dist.close()


if __name__ == "__main__":
    main()
