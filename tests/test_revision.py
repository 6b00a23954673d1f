"""--revision of a hub id (train.py, scores.py, graft.py, report.py) reaches huggingface_hub's snapshot_download,
here replaced in this process by a recorder (no network); with a local directory or the embedded default it is a
one-line error before any work."""
import json

import pytest

import graft
import report
import scores
import train
from checkpoint_io.checkpoint import DEFAULT_NAME

pytest.importorskip("transformers")
HUB_ID, REV = "allenai/OLMo-7B-0424-hf", "step477000-tokens2000B"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_tiny):
    return make_tiny(tmp_path_factory.mktemp("tiny"), n_layers=2)


@pytest.fixture
def hub(monkeypatch, tiny_dir):
    """snapshot_download replaced: records (repo_id, revision) and serves the tiny checkpoint as the snapshot, or,
    with hub.offline = True, fails as an unreachable hub does."""
    import huggingface_hub

    class Hub:
        calls, offline = [], False

    def download(repo_id, revision=None, **kw):
        Hub.calls.append((repo_id, revision))
        if Hub.offline:
            raise OSError("no network")
        return str(tiny_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return Hub


def one_line_error(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


def test_train_and_scores_download_the_revision(hub, tmp_path, small_json):
    metrics = train.main(["--model", HUB_ID, "--revision", REV, "--dataset", small_json, "--epochs", "1",
                          "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "ft")])
    assert hub.calls and set(hub.calls) == {(HUB_ID, REV)}
    assert metrics["args"]["revision"] == REV
    hub.calls.clear()
    scores.main([HUB_ID, str(tmp_path / "ft"), "--revision", REV, "--out", str(tmp_path / "sc"), "--device", "cpu",
                 "--threads", "1"])
    assert hub.calls and set(hub.calls) == {(HUB_ID, REV)}
    settings = json.loads((tmp_path / "sc" / "settings.json").read_text())
    assert settings["ckpt_a"] == HUB_ID and settings["revision"] == REV


def test_graft_and_report_pass_the_revision_on(hub, tmp_path):
    """Both resolve the hub id at the revision before any stage: an unreachable hub ends them with one line, after
    the one download attempt, and nothing is written."""
    hub.offline = True
    msg = one_line_error(graft.main, ["--experiment", "--model", HUB_ID, "--revision", REV, "--out", str(tmp_path / "g"),
                                      "--device", "cpu"])
    assert HUB_ID in msg and hub.calls == [(HUB_ID, REV)]
    hub.calls.clear()
    msg = one_line_error(report.main, ["--model", HUB_ID, "--revision", REV, "--seeds", "1", "--out",
                                       str(tmp_path / "r"), "--work", str(tmp_path / "w"), "--device", "cpu"])
    assert HUB_ID in msg and hub.calls == [(HUB_ID, REV)]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["train", "scores", "graft", "report"])
def test_revision_with_a_directory_or_the_embedded_default_is_one_line(script, hub, tiny_dir, tmp_path, small_json):
    for model in (str(tiny_dir), DEFAULT_NAME):
        argv = {"train": ["--model", model, "--dataset", small_json, "--out", str(tmp_path / "o")],
                "scores": [model, str(tiny_dir), "--out", str(tmp_path / "o")],
                "graft": ["--experiment", "--model", model, "--out", str(tmp_path / "o")],
                "report": ["--model", model, "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]}[script]
        msg = one_line_error({"train": train.main, "scores": scores.main, "graft": graft.main,
                              "report": report.main}[script], [*argv, "--revision", REV, "--device", "cpu"])
        assert f"--revision {REV} with {model!r}" in msg and "drop --revision" in msg
    assert not hub.calls and not (tmp_path / "o").exists() and not (tmp_path / "w").exists()
