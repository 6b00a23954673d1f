"""Progress with an estimate (run_setup/progress.py): plain lines with the elapsed and the remaining time when not on a
terminal, a tqdm bar on one, nothing on a torchrun rank other than 0; and a tiny finetune and its scores report
every pass so."""
import re
import sys
import time

import pytest

from run_setup import progress as P
import scores
import train

LINE = re.compile(r"^(?P<desc>.+): (?P<n>\d+)/(?P<total>\d+|\?) (?P<unit>\w+), (?P<elapsed>[\d.]+ (s|min|h)) "
                  r"elapsed, (about (?P<left>[\d.]+ (s|min|h)) left|time left unknown)$")


def lines_of(err):
    """The progress lines of captured stderr, parsed: (desc, done, total, left) each."""
    out = []
    for line in err.splitlines():
        m = LINE.match(line)
        if m:
            out.append((m["desc"], int(m["n"]), m["total"], m["left"]))
    return out


def test_estimate_is_the_mean_pace_times_what_is_left():
    assert P.estimate(2, 4, 10.0) == "10 s elapsed, about 10 s left"
    assert P.estimate(1, 10, 30.0) == "30 s elapsed, about 4.5 min left"
    assert P.estimate(0, 10, 3.0) == "3 s elapsed, time left unknown"
    assert P.duration(7200) == "2.0 h"


def test_plain_lines_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(P, "EVERY_S", 0.0)                          # a line at every item
    assert list(P.progress(range(3), "thing", unit="item")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert [x[:3] for x in lines_of(err)] == [("thing", 1, "3"), ("thing", 2, "3")]     # the last one: "done"
    assert err.splitlines()[-1].startswith("thing: done, 3 items in ") and len(err.splitlines()) == 3
    monkeypatch.setattr(P, "EVERY_S", 60.0)                         # a short pass says nothing
    list(P.progress(range(3), "quick"))
    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal_and_silence_off_rank_0(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = P.progress(range(2), "x")
    assert isinstance(bar, P.tqdm) and not bar.disable and bar.delay == P.DELAY_S
    bar.close()
    monkeypatch.setenv("RANK", "1")                                 # torchrun: rank 0 alone reports
    monkeypatch.setattr(P, "EVERY_S", 0.0)
    assert list(P.progress(range(2), "x")) == [0, 1]
    with P.progress(desc="y", total=2) as bar:
        bar.update()
    assert capsys.readouterr().err == ""


def test_ticking_reports_a_long_call_against_what_a_like_one_took(monkeypatch, capsys):
    monkeypatch.setattr(P, "EVERY_S", 0.0)
    with P.ticking("pass 2/3", expected_s=4):
        time.sleep(1.5)
    got = lines_of(capsys.readouterr().err)
    assert got and got[0][:3] == ("pass 2/3", 1, "4") and got[0][3] == "3 s"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_tiny):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_a_tiny_finetune_and_its_scores_report_every_pass(tiny_dir, small_json, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, "EVERY_S", 0.0)
    train.main(["--model", str(tiny_dir), "--dataset", small_json, "--out", str(tmp_path / "ft"), "--epochs", "2",
                "--lr", "1e-2", "--device", "cpu"])
    err = capsys.readouterr().err
    got = lines_of(err)
    steps = [x for x in got if x[0].startswith("finetune epoch")]
    # 10 facts at batch 8: 2 steps an epoch, each epoch's steps counted with the time left
    assert [x[:3] for x in steps] == [("finetune epoch 1/2", 1, "2"), ("finetune epoch 2/2", 1, "2")]
    assert all(x[3] is not None for x in steps)                      # each with the time left
    assert err.count("finetune epoch 2/2: done, 2 steps in") == 1
    assert "ranks of 10 prompts: done, 1 batch" in err               # the evaluation
    assert "loss before training: done, 2 batches in" in err
    scores.run(tiny_dir, tmp_path / "ft", tmp_path / "sc", device="cpu", log=lambda *_: None)
    got = lines_of(capsys.readouterr().err)
    assert [x[1] for x in got if x[0] == "pass 3/3, the scores"] == [1, 2, 3]    # of 4 layers; the last: "done"
    # eq. 6's partial pass at layer l runs the L - l blocks from l on: the time left weighs each layer so
    assert [x[1:3] for x in got if x[0] == "eq. 6's partial passes"] == [(4, "10"), (7, "10"), (9, "10")]
