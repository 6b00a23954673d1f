"""paper_report/sweep.py (the lr x epochs grid and the gentle cell), the replay ordering, evaluation at the last epoch
only, and the salience correlation: on a tiny random model, and on stub stage outputs rendered into REPORT.md."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from paper_report import preconditions
import report as R
from paper_report import stats, sweep
import train
from checkpoint_io.checkpoint import from_pretrained, load_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_tiny):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def settings(tiny_dir, **kw):
    return train.Settings(**{"model": str(tiny_dir), "dataset": "first_hop", "lr": 1e-2, "epochs": 2, "device": "cpu",
                             **kw})


def test_final_only_evaluation_is_the_last_record_of_a_full_one(tiny_dir):
    """eval "final" (the report's stages whose curves nobody draws) gives the same weights, to the bit, and the
    same last record as evaluating after every epoch."""
    full_model, full = train.run(settings(tiny_dir))
    last_model, last = train.run(settings(tiny_dir, eval="final"))
    assert [r["epoch"] for r in last["records"]] == [2]
    assert full["records"][-1] == last["records"][0]                  # evaluating does not change the training
    want = full_model.state_dict()
    for k, v in last_model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_replay_keeps_the_facts_in_the_implication_phase():
    ds = data.load_dataset("daxwug")
    phases = data.phases(ds, "facts_first_replay")
    assert [p[0] for p in phases] == ["pretrain_facts", "pretrain_impls", "finetune"]
    assert phases[1][1] == ds["train_impls"] + ds["train_facts"]
    assert phases[0][1] == ds["train_facts"] and phases[2][1] == ds["test_facts"]


def test_a_grid_cell_and_a_diverged_one(tiny_dir, tmp_path, monkeypatch):
    base = from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    st = sweep.grid_stages(settings(tiny_dir), tmp_path / "seed0", lambda: base, lambda *_: None)
    assert len(st) == 2 * len(sweep.LRS) * len(sweep.EPOCHS)
    name, path, action = next(x for x in st if x[0] == "grid_first_hop_lr0.0001_ep4")
    action()
    cell = json.loads(path.read_text())
    assert cell["lr"] == 1e-4 and cell["epochs"] == 4 and not cell["diverged"] and 0 <= cell["fact_mean_rank"] <= 19
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())   # the base is copied, not trained

    def diverge(*a, **k):
        raise train.UserError("training diverged: the loss is nan")
    monkeypatch.setattr(train, "run", diverge)
    _, path2, action2 = st[-1]
    action2()
    assert json.loads(path2.read_text())["diverged"] is True
    grid = sweep.collect_grid(tmp_path, [0])
    assert grid["first_hop"]["0.0001:4"]["fact"] == [cell["fact_mean_rank"]]
    assert grid["second_hop"]["0.001:16"]["diverged"] == [True] and grid["second_hop"]["0.001:16"]["fact"] == [None]
    assert grid["first_hop"]["0.001:4"]["diverged"] == [None]             # not run


def stub_grid(stubs, work, seeds, learns_from=(1e-4, 8), first_ocr=(3e-4, 8), second_ocr=(1e-3, 16)):
    """Grid cells: first-hop facts learned from lr x epochs `learns_from` on, first-hop OCR from `first_ocr` on
    (in lr, then epoch order), one second-hop cell with OCR; the base model's implication rank: 9.5."""
    for seed in seeds:
        for hop in sweep.HOPS:
            for lr in sweep.LRS:
                for ep in sweep.EPOCHS:
                    learned = (lr, ep) >= learns_from
                    ocr = (lr, ep) == second_ocr if hop == "second_hop" else (lr, ep) >= first_ocr
                    impl = 1.0 + seed if ocr else 9.0
                    stubs.write(work / f"seed{seed}" / "grid" / f"{sweep.cell_name(hop, lr, ep)}.json",
                          {"hop": hop, "lr": lr, "epochs": ep, "seed": seed, "diverged": False,
                           "fact_mean_rank": 0.0 if learned else 6.0, "impl_mean_rank": impl})


def test_gentlest_cell_is_the_smallest_lr_then_fewest_epochs_with_ocr(tmp_path, stubs):
    stub_grid(stubs, tmp_path, [0, 1])
    grid = sweep.collect_grid(tmp_path, [0, 1])
    assert sweep.gentlest(grid, [9.5, 9.5]) == (3e-4, 8)          # 1e-4 x 8 learns the facts, without OCR
    assert sweep.gentlest(grid, [9.5, 2.0]) is None               # seed 1's base is as good already: no OCR
    (tmp_path / "seed1" / "grid" / f"{sweep.cell_name('first_hop', 3e-5, 4)}.json").unlink()
    assert sweep.gentlest(sweep.collect_grid(tmp_path, [0, 1]), [9.5, 9.5]) is None   # incomplete: no choice yet


def test_report_renders_grid_gentle_replay_and_salience(tmp_path, stubs):
    work, out = tmp_path / "work", tmp_path / "out"
    for seed in (0, 1):
        w = work / f"seed{seed}"
        stubs.stub_seed(w, first_impl=1.0 + seed)
        stubs.write(w / "daxwug_facts_first_replay" / "metrics.json",
                    {"records": stubs.records(["pretrain_facts", "pretrain_impls"], 0.0, 0.0)
                                + stubs.records(["finetune"], 0.0, 1.5)})
        # salience: the better the base knows the city's language (margin), the lower the implication's rank
        margin = np.linspace(-2, 3, 20)
        stubs.write(w / "salience.json", {hop: {"base_margin": margin.tolist(), "base_rank": (-margin).tolist(),
                                          "impl_rank": (10 - 2 * margin).tolist()} for hop in sweep.HOPS})
        g = sweep.gentle_dir(w, (3e-4, 8))
        stubs.stub_seed(g, seed=seed)                                    # Fig. 4 / Table 3 / Fig. 6 stubs again
        res_g = json.loads((g / "graft" / "results.json").read_text())
        res_g["settings"] = {"lr": 3e-4, "epochs": 8}
        stubs.write(g / "graft" / "results.json", res_g)
    stub_grid(stubs, work, [0, 1])
    out.mkdir()
    res = R.write_report("stub-model", [0, 1], work, out)
    text = (out / "REPORT.md").read_text()
    assert "## Learning rate x epochs grid" in text and "](grid.png)" in text and (out / "grid.png").exists()
    assert "| 0.0001 | 6.00 / 9.00 | 0.00 / 9.00 |" in text                 # lr 1e-4: learned from 8 epochs on
    assert "OCR at: 0.001 x 16" in text                                    # second hop: 9.5 -> 1.0 / 2.0
    assert "OCR at: 0.0003 x 8 (fall" in text                              # first hop; 1e-4 x 16 only learns
    assert "## Fig. 4, Table 3 and Fig. 6 at the gentle cell: lr 0.0003 x 8 epochs" in text
    gentle = text.split("at the gentle cell: lr")[1]
    assert gentle.count("**reproduced**") == 4                # Fig. 4, Table 3, Fig. 6 in both definitions, stubs
    assert "facts_first_replay (ours" in text
    sal = res["salience"]["first_hop"]
    assert sal["rho_margin"] == pytest.approx(-1.0) and sal["rho_rank"] == pytest.approx(1.0)
    assert sal["n"] == 40 and sal["p_margin"] < 1e-3
    assert "## Beyond the paper: salience of the known hop and OCR" in text


def test_midranks_share_ties_and_spearman_is_pearson_of_ranks():
    assert stats.midranks([3.0, 1.0, 1.0, 2.0]).tolist() == [3.0, 0.5, 0.5, 2.0]
    assert stats.midranks([5, 1, 2, 0], strata=[0, 0, 1, 1]).tolist() == [1.0, 0.0, 1.0, 0.0]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    y = x + y                                                           # correlated
    rho, p, n = stats.spearman_pooled(np.exp(x), y, [0] * 30)            # a monotone map keeps rho
    assert rho == pytest.approx(stats.spearman_pooled(x, y, [0] * 30)[0])
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)            # no ties here: plain ranks
    assert rho == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1]) and p < 0.01 and n == 30


def test_salience_of_a_constant_known_hop_is_undefined_not_nan():
    """Gemma 3 270M ranks every city's language at 0: rho with a constant is undefined, so results.json holds
    null (JSON has no NaN) and REPORT.md says so, while the margin's rho is still computed."""
    from paper_report import collect, render
    margin = np.linspace(-2, 3, 20)
    sal = {hop: {"base_margin": margin.tolist(), "base_rank": [0.0] * 20, "impl_rank": (10 - 2 * margin).tolist()}
           for hop in sweep.HOPS}
    out = collect.salience_pooled([sal])
    assert out["first_hop"]["rho_rank"] is None and out["first_hop"]["p_rank"] is None
    assert out["first_hop"]["rho_margin"] == pytest.approx(-1.0)
    json.dumps(out, allow_nan=False)
    text = "\n".join(render.salience_section({"salience": out}))
    assert "| first_hop | 20 | -1.000 |" in text and "— (constant) | — |" in text


def test_salience_per_prompt_numbers_agree_with_the_mean_rank(tiny_dir, tmp_path):
    base = from_pretrained(tiny_dir)
    tok = load_tokenizer(tiny_dir)
    s = settings(tiny_dir, epochs=1)
    model, metrics = train.run(s, model=from_pretrained(tiny_dir))
    train.save(model, tmp_path / "ft", metrics)
    out = preconditions.salience(base, tok, {"first_hop": tmp_path / "ft"}, seed=0)["first_hop"]
    impl = data.load_dataset("first_hop")["implications"]
    assert np.mean(out["impl_rank"]) == pytest.approx(data.mean_rank(model, tok, impl))
    assert out["known_prompts"][0].endswith(" speak") and len(out["base_margin"]) == 20
    right = np.array(out["base_margin"]) > 0                            # margin > 0 exactly when rank 0
    assert (right == (np.array(out["base_rank"]) == 0)).all()


def test_tiny_report_end_to_end_with_grid_and_gentle_cell(tiny_dir, tmp_path, monkeypatch):
    """Every stage of report.py, the grid (shrunk to 2 x 2) and the gentle cell, in process, on the tiny model."""
    monkeypatch.setattr(sweep, "LRS", (3e-3, 1e-2))
    monkeypatch.setattr(sweep, "EPOCHS", (1, 2))
    monkeypatch.setattr(sweep, "gentlest", lambda grid, base: (3e-3, 1) if grid else None)   # the tiny model's OCR aside
    work, out = tmp_path / "work", tmp_path / "out"
    R.run_stages(str(tiny_dir), [0], work, grid=True)
    times = {**json.loads((work / "seed0" / "stage_times.json").read_text()),
             **json.loads((work / "seed0" / "grid" / "stage_times.json").read_text())}
    failed = {k: v["error"] for k, v in times.items() if v["status"] != "ok"}
    assert not failed, failed
    assert len([k for k in times if k.startswith("grid_")]) == 2 * 2 * 2
    assert {"gentle_graft", "gentle_daxwug_impl_first", "gentle_daxwug_joint",
            "gentle_daxwug_facts_first_replay", "salience", "daxwug_facts_first_replay", "exact_first_hop"} <= set(times)
    g = json.loads((sweep.gentle_dir(work / "seed0", (3e-3, 1)) / "graft" / "results.json").read_text())
    assert g["settings"]["lr"] == 3e-3 and g["settings"]["epochs"] == 1
    res = R.write_report(str(tiny_dir), [0], work, out)
    text = (out / "REPORT.md").read_text()
    assert "at the gentle cell: lr 0.003 x 1 epochs" in text and (out / "grid.png").exists()
    assert f"`python report.py --model {res['model']} --grid --seeds 1`" in text
    assert "| 0 | grid (8 of 8 cells ok) | ok |" in text                 # the stage times: one row for the grid
    assert "| 0 | daxwug_joint | ok |" in text                          # from the joint item's own times file
    records = lambda d: json.loads((work / "seed0" / d / "metrics.json").read_text())["records"]
    epochs = records("first_hop")[-1]["epoch"]
    assert [r["epoch"] for r in records("first_hop")] == list(range(epochs + 1))   # Fig. 2 draws every epoch
    assert [r["epoch"] for r in records("first_hop_early_pre")] == [epochs]       # Table 2 reads the last only
    assert res["fig4"]["facts_first_replay"][0] and res["salience"]["second_hop"]["n"] == 20
    assert len(R.verdicts(res)) == 9 and not any(v == "missing" for _, v, _, _ in R.verdicts(res))
    ex = json.loads((work / "seed0" / "exact_first_hop" / "exact.json").read_text())["full_ablation"]["informative"]
    section = text.split("### Exact against linearized scores")[1].split("##")[0]
    assert f"| informative (eq. 1 vs 4) | {ex['pearson_r']:+.2f} (MLPs {ex['pearson_r_mlp']:+.2f}" in section


def test_premise_cell_is_the_first_where_f_survives_and_f_prime_is_learned(monkeypatch):
    monkeypatch.setattr(sweep, "GRAFT_LRS", (1e-5, 1e-4))
    monkeypatch.setattr(sweep, "GRAFT_EPOCHS", (8, 16))
    c = lambda f_kept, impl=0.0, fp=0.0: {"F (W_F)": 0.0, "Impl F (W_F,ImplF)": impl, "F (W_F,ImplF)": f_kept,
                                          "F' (W_F')": fp}
    sw = {"1e-05:8": c(0.2, fp=3.0), "1e-05:16": c(0.5, impl=2.0), "0.0001:8": c(5.9), "0.0001:16": c(0.9)}
    assert sweep.premise_cell(sw) == (1e-4, 16)             # F' unlearned, Impl F unlearned, F forgotten, then holds
    sw["0.0001:16"] = c(1.1)
    assert sweep.premise_cell(sw) is None
    text = "\n".join(sweep.graft_sweep_section({"graft_sweep": sw}))
    assert "| 0.0001 x 8 | 0.00 | 0.00 | 5.90 | 0.00 | no |" in text and "No cell keeps F" in text


def test_graft_sweep_and_the_premise_cell_end_to_end(tiny_dir, tmp_path, monkeypatch):
    """report.py --graft-sweep on the tiny model, the sweep shrunk to one cell and the report's other stages
    skipped: the sweep's stages train at a constant rate, the 1-epoch cell's W_F and W_F' are the 2-epoch runs'
    snapshots, the premise cell's graft reuses them on seed 0, and REPORT.md shows the sweep and the cell's verdicts
    in both Fig. 6 definitions."""
    monkeypatch.setattr(sweep, "GRAFT_LRS", (3e-3,))
    monkeypatch.setattr(sweep, "GRAFT_EPOCHS", (1, 2))
    monkeypatch.setattr(R, "stages", lambda *a, **kw: [])
    monkeypatch.setattr(sweep, "premise_cell", lambda sw: (3e-3, 1) if sw else None)   # the tiny model's ranks aside
    work = tmp_path / "work"
    R.run_stages(str(tiny_dir), [0], work, graft_sweep=True)
    w = work / "seed0"
    times = {**json.loads((w / "graft_sweep" / "stage_times_lr0.003.json").read_text()),
             **json.loads((w / "stage_times.json").read_text()),
             **json.loads((w / "stage_times_premise_joint.json").read_text())}
    assert not {k: v["error"] for k, v in times.items() if v["status"] != "ok"}
    assert {"graft_sweep_lr0.003_W_F", "graft_sweep_lr0.003_W_Fp", "graft_sweep_lr0.003_ep1_W_F_ImplF",
            "graft_sweep_lr0.003_ep2_W_F_ImplF", "authors_graft", "authors_daxwug_impl_first",
            "authors_daxwug_joint"} <= set(times)
    g = sweep.premise_dir(w, (3e-3, 1)) / "graft"
    wf = json.loads((g / "W_F" / "metrics.json").read_text())
    assert wf["args"]["schedule"] == "constant" and wf["args"]["lr"] == 3e-3 and wf["args"]["epochs"] == 1
    g2 = sweep.premise_dir(w, (3e-3, 2)) / "graft"
    assert wf["snapshot_of"] == str(g2 / "W_F") and [r["epoch"] for r in wf["records"]] == [1]   # evaluated then
    wfp = json.loads((g / "W_Fp" / "metrics.json").read_text())
    assert wfp["snapshot_of"] == str(g2 / "W_Fp") and [r["epoch"] for r in wfp["records"]] == [1]
    for cell, ep in ((g, 1), (g2, 2)):                           # each cell's W_F,ImplF: from that cell's W_F
        m = json.loads((cell / "W_F_ImplF" / "metrics.json").read_text())
        assert m["args"]["epochs"] == ep and Path(m["base_model"]) == cell / "W_F"
    # the graft stage reused the sweep's three trainings: they ran once, in the sweep
    assert times["graft_sweep_lr0.003_W_F"]["status"] == "ok"
    # nothing at the sweep's cells or the premise cell is read but each phase's last ranks: each stage evaluated
    # after its last epoch only (a snapshot: at its epoch)
    cell = sweep.premise_dir(w, (3e-3, 1))
    for m in [cell / "graft" / n / "metrics.json" for n in ("W_F_ImplF", "W_ImplF", "W_F_ImplF_test")] + \
            [g2 / n / "metrics.json" for n in ("W_F", "W_Fp", "W_F_ImplF")] + \
            [cell / o / p / "metrics.json" for o, p in (("daxwug_impl_first", "pretrain_facts"),
                                                         ("daxwug_facts_first_replay", "finetune"))]:
        m = json.loads(m.read_text())
        assert m["args"]["eval"] == "final" and len(m["records"]) == 1, m["base_model"]
    joint = json.loads((cell / "daxwug_joint" / "metrics.json").read_text())["records"]
    assert [(r["phase"], r["epoch"]) for r in joint] == [("pretrain_joint", 1), ("finetune", 1)]
    res = R.collect(str(tiny_dir), [0], work)
    assert set(res["graft_sweep"]["0.003:1"]) == {"F (W_F)", "Impl F (W_F,ImplF)", "F (W_F,ImplF)", "F' (W_F')"}
    assert res["premise"]["fig6_authors"]["mlp"]["n"] > 0 and res["premise"]["settings"]["lr"] == 3e-3
    text = R.render(res, {})
    assert "## Graft sweep: where the mechanism's premise holds" in text
    assert "at the premise cell: lr 0.003 x 1 epochs" in text and "Fig. 6 correlation (authors' code)" in text
    assert f"Generated by `python report.py --model {res['model']} --graft-sweep --seeds 1`" in text   # what ran
