"""Every table and figure of the paper for one model, side by side with the paper's OLMo-7B, in REPORT.md.

    python report.py [--model smollm2-135m] [--seeds N] [--out results/<model>] [--work runs/report/<model>]

Stages, per seed s, each a directory or file under --work/seed{s} written atomically by its own tool, and
skipped when it already exists (a failed stage is reported and the rest go on):
    first_hop, second_hop          train.py: Fig. 2; Table 2 None (last epoch) and All (epoch 0: the base)
    scores_first_hop, _second_hop  scores.py on those finetunes: Fig. 3
    freeze_post_{hop}.json         Table 2 Early / Late: the plain finetune with its early / late layers reset to
                                   the base, which is what `train.py --freeze X --freeze-when post` computes
                                   (it trains the same model with the same seed first): no second training
    {hop}_{early,late}_pre         train.py --freeze X --freeze-when pre: Table 2 Early (pre) / Late (pre)
    graft                          graft.py --experiment: Table 3, Fig. 6, and Fig. 4's facts-first ordering
    daxwug_impl_first              Fig. 4: graft's W_ImplF, then train facts, then test facts (graft.train_stage)
    daxwug_joint                   train.py --dataset daxwug --order joint: Fig. 4
    preconditions.json             preconditions.base_knowledge: does the base model know the hops the claims need
Then collect.collect() reads those outputs into results.json (every number per seed), claims.py judges each claim
on the seed means, and render.render() (a pure function of the results) writes REPORT.md.
"""
import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import data
import graft
import train
import claims                                                     # noqa: F401
from claims import HOPS, ORDERS, verdicts                          # noqa: F401 (report.verdicts, re-exported)
from collect import collect, read_json
from figures import make_figures
from model import DEFAULT_NAME, from_pretrained, load_tokenizer, resolve
from render import _write, render, write_json                      # _write: the one atomic writer of outputs

ROOT = Path(__file__).resolve().parent


def log(msg):
    print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- stages ------------------------------------------------------------------------------------------------

def freeze_post(model, ckpt, hop, seed, out):
    """Table 2 "post": the finetune `ckpt` with the early or late layers reset to the base `model`, evaluated."""
    ds = data.load_dataset(hop, seed=seed)
    base = resolve(model)
    tok = load_tokenizer(base)
    res = {}
    for which in ("early", "late"):
        m = from_pretrained(ckpt)
        m.source = base                         # train.reset_layers copies from model.source: the base W
        layers = train.split_layers(m.config.n_layers, which)
        train.reset_layers(m, layers)
        res[which] = {"layers": layers, "fact_mean_rank": data.mean_rank(m, tok, ds["facts"]),
                      "impl_mean_rank": data.mean_rank(m, tok, ds["implications"])}
        log(f"{hop} reset {which} layers {layers[0]}..{layers[-1]}: fact {res[which]['fact_mean_rank']:.2f} "
            f"impl {res[which]['impl_mean_rank']:.2f}")
    write_json(out, res)


def stages(model, seed, w):
    """(name, output that marks it done, command list or callable) for one seed, cheapest first."""
    py, m, s = sys.executable, str(model), str(seed)
    out = []
    for hop in HOPS:
        out.append((hop, w / hop / "metrics.json",
                    [py, str(ROOT / "train.py"), "--model", m, "--dataset", hop, "--seed", s, "--out", str(w / hop)]))
        out.append((f"scores_{hop}", w / f"scores_{hop}" / "scores.safetensors",
                    [py, str(ROOT / "scores.py"), m, str(w / hop), "--out", str(w / f"scores_{hop}")]))
        out.append((f"freeze_post_{hop}", w / f"freeze_post_{hop}.json",
                    lambda hop=hop: freeze_post(model, w / hop, hop, seed, w / f"freeze_post_{hop}.json")))
        for which in ("early", "late"):
            d = w / f"{hop}_{which}_pre"
            out.append((d.name, d / "metrics.json", [py, str(ROOT / "train.py"), "--model", m, "--dataset", hop,
                                                      "--seed", s, "--freeze", which, "--freeze-when", "pre",
                                                      "--out", str(d)]))
    out.append(("graft", w / "graft" / "results.json",
                [py, str(ROOT / "graft.py"), "--experiment", "--model", m, "--seed", s, "--out", str(w / "graft")]))
    out.append(("daxwug_impl_first", w / "daxwug_impl_first" / "metrics.json", lambda: impl_first(seed, w)))
    d = w / "daxwug_joint"
    out.append((d.name, d / "metrics.json", [py, str(ROOT / "train.py"), "--model", m, "--dataset", "daxwug",
                                              "--order", "joint", "--seed", s, "--out", str(d)]))
    return out


def impl_first(seed, w):
    """Fig. 4 implications-first: graft.py's W_ImplF (the base trained on Impl F), then the train facts, then the
    test facts; the phases, seed and fresh optimizers of `train.py --order impl_first`, one training fewer."""
    d = data.load_dataset("daxwug", seed=seed)
    g, out = w / "graft", w / "daxwug_impl_first"
    first = read_json(g / "W_ImplF" / "metrics.json")
    if first is None:
        raise RuntimeError(f"{g / 'W_ImplF'} is missing: the graft stage has to run first")
    second = graft.train_stage(g / "W_ImplF", d["train_facts"], d["train_impls"], out / "W_ImplF_F", seed, log)
    third = graft.train_stage(out / "W_ImplF_F", d["test_facts"], d["test_impls"], out / "W_ImplF_F_test", seed, log)
    records = [{**r, "phase": "pretrain_impls"} for r in graft.swap(first["records"])] + \
        [{**r, "phase": "pretrain_facts"} for r in second["records"]] + \
        [{**r, "phase": "finetune"} for r in third["records"]]
    write_json(out / "metrics.json", {"order": "impl_first", "seed": seed, "records": records,
                                      "built_from": [str(g / "W_ImplF"), str(out / "W_ImplF_F"),
                                                     str(out / "W_ImplF_F_test")]})


def run_stages(model, seeds, work):
    """Run what is not done yet; every stage's time, status and error go to seed{s}/stage_times.json."""
    for seed in seeds:
        w = work / f"seed{seed}"
        w.mkdir(parents=True, exist_ok=True)
        times_file = w / "stage_times.json"
        times = read_json(times_file) or {}
        todo = stages(model, seed, w)
        for i, (name, done, action) in enumerate(todo, 1):
            if done.exists():
                log(f"seed {seed} stage {i}/{len(todo)} {name}: done before, reused")
                if times.get(name, {}).get("status") in (None, "failed"):     # finished outside this tool
                    times[name] = {"status": "reused", "seconds": None}
                continue
            log(f"seed {seed} stage {i}/{len(todo)} {name}: running")
            t0, load = time.time(), os.getloadavg()[0]
            try:
                if callable(action):
                    action()
                else:
                    r = subprocess.run(action, stderr=subprocess.PIPE, text=True)
                    sys.stderr.write(r.stderr)
                    if r.returncode != 0:
                        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
                        raise RuntimeError(f"exit {r.returncode}: {last}")
                times[name] = {"status": "ok", "seconds": round(time.time() - t0, 1), "load_at_start": load}
                log(f"seed {seed} {name}: done in {time.time() - t0:.0f} s")
            except Exception as e:                 # report it and go on: finished stages stay as they are
                times[name] = {"status": "failed", "seconds": round(time.time() - t0, 1), "error": str(e)[:300]}
                log(f"seed {seed} {name}: FAILED: {e}")
            write_json(times_file, times)


# --- the results: collect (collect.py), claims and verdicts (claims.py), REPORT.md (render.py), figures -------

def write_report(model, seeds, work, out):
    """collect() -> figures -> results.json (every number per seed) -> REPORT.md, each written atomically."""
    res = collect(model, seeds, work)
    res["cpus"] = os.cpu_count()
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    figs = make_figures(res, out)
    write_json(Path(out) / "results.json", res)
    _write(Path(out) / "REPORT.md", render(res, figs))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_NAME, help="base model: the embedded default, a directory or a hub id")
    p.add_argument("--seeds", type=int, default=3, help="repeat every stage over seeds 0..N-1 (the verdicts are on "
                                                         "the seed means, with paired tests across seeds)")
    p.add_argument("--out", default=None, help="where REPORT.md, its figures and results.json go "
                                               "(default results/<model name>)")
    p.add_argument("--work", default=None, help="stage outputs, checkpoints included (default runs/report/<model name>)")
    p.add_argument("--render-only", action="store_true", help="only rebuild REPORT.md from finished stages")
    args = p.parse_args(argv)
    name = Path(str(args.model)).name
    out = Path(args.out or Path("results") / name)
    work = Path(args.work or Path("runs") / "report" / name)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    t0 = time.time()
    if not args.render_only:
        run_stages(args.model, seeds, work)
    res = write_report(args.model, seeds, work, out)
    for claim, v, _, ev in verdicts(res):
        log(f"{v:>10}  {claim}  [{ev}]")
    log(f"wrote {out}/REPORT.md in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
