"""report.py: REPORT.md from small stub stage outputs (every section, table, figure link and verdict line), the
verdict criteria on known numbers, and a failed stage that neither stops the rest nor loses finished ones."""
import json
import os

import pytest

from paper_report import paper
import report as R


def verdict_lines(text):
    lines = text.split("## Verdicts")[1].split("## Preconditions")[0].strip().splitlines()
    return [ln for ln in lines if ln.startswith("|")][2:]                # without the header and its rule


def test_report_has_every_section_table_figure_and_verdict(tmp_path, stubs):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    for seed in (0, 1):
        stubs.stub_seed(work / f"seed{seed}", first_impl=1.0 + seed)
    R.write_report("stub-model", [0, 1], work, out)
    text = (out / "REPORT.md").read_text()
    for heading in ("## Verdicts", "## Preconditions", "## Seed spread", "## Settings", "## Fig. 2", "## Fig. 3",
                    "## Table 2", "## Fig. 4", "## Table 3", "## Fig. 6", "## Stage times"):
        assert text.count(heading) == 1, heading                   # each once: Table 3 is rendered once
    for row in paper.TABLE2:                                       # Table 2: every row, ours and the paper's
        assert f"| {row} |" in text, row
    assert "| Early | 3.00 ± 0.00 | 5.10 |" in text                # two seeds: mean ± s.e. beside the paper's number
    assert "| None | 0.00 ± 0.00 | 0.00 | 1.50 ± 0.50 | 0.00 |" in text      # s.e. of (1, 2): sd 0.71 / sqrt 2
    for w in paper.TABLE3:
        assert f"| {w} |" in text, w
    assert "| W_graft | 1.00 ± 0.00 | 1.13 |" in text
    assert "| Table 2 None first_hop impl | 1.00 / 2.00 | 1.50 ± 0.50 | 1.00 |" in text     # the seed spread
    assert "| base: landmark -> city (second hop's known hop) | 1.00 / 1.00 | 1.00 ± 0.00 |" in text
    for f in ("fig2.png", "fig3_first_hop.png", "fig3_second_hop.png", "fig4.png", "fig6.png"):
        assert f"]({f})" in text and (out / f).exists(), f
    lines = verdict_lines(text)
    assert len(lines) == 9                 # Fig. 2 x2, Fig. 3, Table 2 x2, Fig. 4, Table 3, Fig. 6 in both definitions
    assert all("**reproduced**" in ln for ln in lines), "\n".join(l for l in lines if "**reproduced**" not in l)
    res = json.loads((out / "results.json").read_text())
    assert res["table2"]["None"]["first_hop"]["impl"] == [1.0, 2.0]       # per-seed values, in seed order
    assert res["fig6"]["mlp"]["n"] == 60 and res["fig6"]["heads"]["n"] == 120    # entries of both seeds, pooled
    assert res["fig6"]["mlp"]["units"] == "per position x layer" and 0 < res["fig6"]["mlp"]["p_perm"] < 0.01
    # the machine and the threads each seed trained with, which the last digits depend on
    assert res["threads"] == [2, 2] and res["machine"].startswith(R.cpu_name())
    assert f"- machine: {res['machine']}; torch threads per seed: 2, 2." in text


def test_verdicts_follow_their_criteria(tmp_path, stubs):
    w = tmp_path / "seed0"
    stubs.stub_seed(w, first_impl=9.2, graft_ok=False)                   # no first-hop OCR, no transfer of Impl F'
    res = R.collect("stub", [0], tmp_path)
    v = {claim.split(":")[0]: verdict for claim, verdict, _, _ in R.verdicts(res)}
    assert v["Fig. 2 first-hop OCR"] == "not"                       # 9.5 -> 9.2 is a fall of less than 0.5
    assert v["Fig. 2 second-hop OCR"] == "reproduced"
    assert v["Table 3 grafting"] == "not"                           # criterion (i) fails
    assert v["Table 2 (post)"] == "partly"                          # the second hop's half still holds


def test_fig6_old_per_component_format_still_reads(tmp_path, stubs):
    w = tmp_path / "seed0"
    stubs.stub_seed(w)
    g = json.loads((w / "graft" / "results.json").read_text())
    for c in ("mlp", "heads"):                                      # graft.py before per-entry scores: no "shape"
        del g["fig6"][c]["shape"]
    stubs.write(w / "graft" / "results.json", g)
    f6 = R.collect("stub", [0], tmp_path)["fig6"]
    assert f6["mlp"]["units"].startswith("per component") and f6["mlp"]["n"] == 30


def test_unlearned_facts_and_unknown_hops_are_inconclusive(tmp_path, stubs):
    stubs.stub_seed(tmp_path / "seed0", second_fact=5.5)                  # the second-hop finetune never learned its facts
    v = {claim.split(":")[0]: verdict for claim, verdict, _, _ in R.verdicts(R.collect("stub", [0], tmp_path))}
    assert v["Fig. 2 second-hop OCR"] == "inconclusive" and v["Fig. 2 first-hop OCR"] == "reproduced"
    for claim in ("Fig. 3 localization", "Table 2 (post)", "Table 2 (pre)"):
        assert v[claim] == "inconclusive", claim
    stubs.stub_seed(tmp_path / "seed1", landmark_city=4.0)                # the base model does not know landmark -> city
    a = {x["id"]: x for x in R.claims.assess(R.collect("stub", [1], tmp_path))}
    assert a["fig2_second_hop"]["verdict"] == "inconclusive" and "landmark -> city" in a["fig2_second_hop"]["precondition"]
    assert a["fig2_first_hop"]["verdict"] == "reproduced"


def test_fig4_sees_forgetting_at_the_end_of_continued_pretraining(tmp_path, stubs):
    stubs.stub_seed(tmp_path / "seed0", impl_first_forgets=True)
    a = {x["id"]: x for x in R.claims.assess(R.collect("stub", [0], tmp_path))}
    assert a["fig4"]["verdict"] == "partly"                          # the OCR gaps hold, the train split does not


def test_missing_stage_still_renders(tmp_path, stubs):
    w = tmp_path / "work" / "seed0"
    stubs.stub_seed(w)
    import shutil
    shutil.rmtree(w / "graft")
    stubs.write(w / "stage_times.json", {"graft": {"status": "failed", "seconds": 3.0, "error": "exit 1: error: boom"}})
    text = R.render(R.collect("stub", [0], tmp_path / "work"), {})   # the pure renderer, no figure files
    assert R.render(R.collect("stub", [0], tmp_path / "work"), {}) == text
    assert "not available" in text and "## Failed stages" in text and "error: boom" in text
    # Fig. 4 (its facts-first ordering comes from the graft stage), Table 3 and Fig. 6 in both definitions
    assert sum("**missing**" in ln for ln in verdict_lines(text)) == 4


def test_failed_stage_does_not_stop_the_rest(tmp_path, monkeypatch):
    done = tmp_path / "seed0" / "b.txt"

    def fail(msg):
        raise ValueError(msg)
    fake = [("a", tmp_path / "seed0" / "a.txt", lambda: fail("error: boom")),
            ("b", done, lambda: done.write_text("x")),
            ("c", tmp_path / "seed0" / "c.txt", lambda: (_ for _ in ()).throw(RuntimeError("kaput")))]
    monkeypatch.setattr(R, "stages", lambda model, seed, w, base, device, **kw: fake)
    R.run_stages("m", [0], tmp_path)
    times = json.loads((tmp_path / "seed0" / "stage_times.json").read_text())
    assert times["a"]["status"] == "failed" and "boom" in times["a"]["error"]
    assert times["b"]["status"] == "ok" and done.exists()
    assert times["c"]["status"] == "failed" and "kaput" in times["c"]["error"]
    done.write_text("kept")                                        # a rerun reuses b and keeps its time
    R.run_stages("m", [0], tmp_path)
    again = json.loads((tmp_path / "seed0" / "stage_times.json").read_text())
    assert done.read_text() == "kept" and again["b"] == times["b"]


def test_only_seeds_runs_those_seeds_and_writes_no_report(tmp_path, monkeypatch, capsys):
    calls, run_stages = [], R.run_stages
    monkeypatch.setattr(R, "run_stages", lambda model, seeds, work, device, grid, grid_only, every, graft_sweep,
                        workers, threads: calls.append((seeds, grid, every)))
    out = tmp_path / "out"
    R.main(["--only-seeds", "2,1", "--seeds", "3", "--grid", "--out", str(out), "--work", str(tmp_path / "w")])
    assert calls == [([1, 2], True, [0, 1, 2])] and not out.exists()   # those seeds, no report
    # their gentle-cell stages at the cell chosen on every seed's grid, not on theirs alone
    chosen, ran = [], []
    monkeypatch.setattr(R, "stages", lambda *a, **kw: [])
    monkeypatch.setattr(R.sweep, "grid_stages", lambda *a: [])
    monkeypatch.setattr(R.sweep, "collect_grid", lambda work, seeds: chosen.append(seeds) or {})
    monkeypatch.setattr(R.sweep, "base_impl", lambda work, seeds: chosen.append(seeds) or 9.0)
    monkeypatch.setattr(R.sweep, "gentlest", lambda grid, base: (1e-4, 12))
    monkeypatch.setattr(R, "gentle_stages", lambda model, s, w, base, device, cell: ran.append((w.name, cell)) or [])
    monkeypatch.setattr(R, "from_pretrained", lambda *a, **k: None)
    run_stages("m", [2], tmp_path / "w", grid=True, all_seeds=[0, 1, 2])
    assert chosen == [[0, 1, 2]] * 2 and ran == [("seed2", (1e-4, 12))]
    for bad, msg in ((["--only-seeds", "3", "--seeds", "3"], "seeds are 0..2"), (["--only-seeds", "a"], "integers")):
        with pytest.raises(SystemExit) as e:
            R.main(bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err


# --- the plan, and its items on workers -------------------------------------------------------------------

def test_plan_lists_every_item_after_what_it_reads(monkeypatch):
    monkeypatch.setattr(R.sweep, "GRAFT_LRS", (3e-5, 1e-4))
    items = R.plan([0, 1], grid=True, graft_sweep=True)
    assert [(i.kind, i.seed, i.lr) for i in items] == [
        ("sweep", 0, 3e-5), ("sweep", 0, 1e-4), ("seed", 0, None), ("grid", 0, None), ("seed", 1, None),
        ("grid", 1, None), ("premise", 0, None), ("premise", 1, None), ("gentle", 0, None), ("gentle", 1, None),
        ("joint", 0, None), ("joint", 1, None), ("premise_joint", 0, None), ("premise_joint", 1, None)]
    seen = set()
    for i in items:                                               # one process runs them in this order
        assert set(i.after) <= seen, i
        seen.add(i.key)
    premise1 = items[7]
    assert set(premise1.after) == {("sweep", 0, 3e-5), ("sweep", 0, 1e-4), ("seed", 1, None)}
    assert set(items[9].after) == {("grid", 0, None), ("grid", 1, None), ("seed", 1, None), ("premise", 1, None)}
    assert items[10].after == () and set(items[13].after) == {("sweep", 0, 3e-5), ("sweep", 0, 1e-4)}
    # --only-seeds 1 of 0..2: the sweep (seed 0's) is another process's, so nothing here waits for it
    assert [(i.kind, i.after) for i in R.plan([1], every=[0, 1, 2], graft_sweep=True)] == [
        ("seed", ()), ("premise", (("seed", 1, None),)), ("joint", ()), ("premise_joint", ())]
    assert [i.kind for i in R.plan([0], grid_only=True, grid=True, graft_sweep=True)] == ["sweep", "sweep", "grid"]


def fake_item(work, item):
    """A worker's item that records when it ran, in which process (importable by the spawned workers)."""
    import time
    t0 = time.time()
    time.sleep(0.5)
    (work / f"{item.kind}{item.seed}{item.lr}.json").write_text(
        json.dumps({"start": t0, "end": time.time(), "pid": os.getpid()}))
    if item.kind == "seed" and item.seed == 1:
        raise RuntimeError("a worker's item fails")               # logged; the items after it still run


def test_one_process_on_several_cores_is_told_of_workers():
    """report.py in one process of several CPU threads says what --workers would do; nothing on one thread, one
    group of stages, or a GPU."""
    from run_setup import workers
    said = []
    workers.suggest(7, 2, "cpu", said.append)
    assert len(said) == 1 and "`--workers 2` runs 2 of them side by side" in said[0]
    for args in ((7, 1, "cpu"), (1, 2, "cpu"), (7, 2, "cuda:0")):
        workers.suggest(*args, said.append)
    assert len(said) == 1


def test_workers_take_items_up_in_plan_order_after_what_they_read(tmp_path, monkeypatch):
    from functools import partial
    from run_setup import workers
    monkeypatch.setattr(R.sweep, "GRAFT_LRS", (3e-5, 1e-4))
    items, said = R.plan([0, 1, 2], graft_sweep=True), []
    workers.run_parallel(partial(fake_item, tmp_path), items, 2, 2, said.append)
    ran = {i.key: json.loads((tmp_path / f"{i.kind}{i.seed}{i.lr}.json").read_text()) for i in items}
    for i in items:
        for a in i.after:
            assert ran[a]["end"] <= ran[i.key]["start"], (i.key, a)
    assert len({r["pid"] for r in ran.values()}) == 2              # two processes, not this one
    assert os.getpid() not in {r["pid"] for r in ran.values()}
    spans = sorted((r["start"], r["end"]) for r in ran.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))      # they overlap: in parallel
    assert "seed 1 seed: its worker FAILED: a worker's item fails" in said


def test_only_the_first_seed_scores_upstream(tmp_path, monkeypatch):
    """eq. 6's partial passes (most of a scores stage) run at the report's first seed, whose scores.png REPORT.md
    shows; the others compute what REPORT.md reads of them (Fig. 3's informative and downstream statistics)."""
    seen = {}
    monkeypatch.setattr(R.scores, "run", lambda model, a, out, **kw: seen.__setitem__(f"{a.parent.name}/{a.name}",
                                                                                      kw["kinds"]))
    monkeypatch.setattr(R, "run_list", lambda seed, w, todo, *a: [fn() for name, _, fn in todo
                                                                  if name.startswith("scores_")])
    for seed in (0, 1, 2):
        R.run_item("stub-model", tmp_path, "cpu", R.workers_.Item("seed", seed), [0, 1, 2], base=None)
    two = ("informative", "downstream")
    assert seen == {"seed0/first_hop": R.scores.KINDS, "seed0/second_hop": R.scores.KINDS,
                    "seed1/first_hop": two, "seed1/second_hop": two, "seed2/first_hop": two, "seed2/second_hop": two}
