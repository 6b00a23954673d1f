"""A sharded checkpoint in the exact huggingface_hub cache layout trains, scores and grafts with the same numbers as
the same weights in one plain file; and a checkpoint's files are read or copied only from inside it (issue 28,
classes 1 and 5: checkpoint.checkpoint_file)."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_io import checkpoint as C
import graft
import scores
import train

from test_outputs import one_line_error, train_main

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_layout(plain, root, shard_bytes=60_000):
    """`plain`'s weights, sharded by write_checkpoint, laid out as huggingface_hub's snapshot_download leaves them:
    root/models--o--n/blobs/<sha256> holds the bytes, snapshots/<rev>/NAME is a relative link ../../blobs/<sha256>
    (shards, index, config.json, tokenizer.json alike), refs/main names the revision. Returns the snapshot."""
    staging = root / "staging"
    staging.mkdir(parents=True)
    C.write_checkpoint(C.from_pretrained(plain), staging, shard_bytes=shard_bytes)
    repo = root / "models--o--n"
    snap = repo / "snapshots" / REV
    for d in (repo / "blobs", snap, repo / "refs"):
        d.mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    for f in sorted(staging.iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        os.replace(f, repo / "blobs" / sha)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    staging.rmdir()
    return snap


def tensors(d):
    """Every tensor of the checkpoint or scores directory `d`, whatever its sharding."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, make_tiny):
    root = tmp_path_factory.mktemp("hub")
    plain = make_tiny(root / "plain", n_layers=2)
    return plain, hub_layout(plain, root / "cache")


def test_the_layout_is_the_hubs_and_resolves_from_an_id(dirs, monkeypatch):
    plain, snap = dirs
    shards = sorted(p.name for p in snap.glob("model-*.safetensors"))
    assert len(shards) >= 3 and all(p.is_symlink() for p in snap.iterdir())
    assert all(os.readlink(p).startswith("../../blobs/") for p in snap.iterdir())
    assert [f.name for f in C.safetensors_files(snap)] == shards          # the names, not the blobs' names
    from huggingface_hub import constants                                 # offline (conftest): the cache only
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(snap.parents[2]))
    assert C.resolve("o/n") == snap.resolve()
    assert_same(C.from_pretrained("o/n").state_dict(), C.from_pretrained(plain).state_dict())


def test_train_scores_and_graft_give_the_same_numbers_as_one_plain_file(dirs, small_json, tmp_path):
    plain, snap = dirs
    runs = {}
    for name, base in (("plain", plain), ("hub", snap)):
        runs[name] = tmp_path / f"run_{name}"
        train_main(base, small_json, runs[name])
        assert not any(p.is_symlink() for p in runs[name].iterdir())    # the side files copied, not linked
        scores.main([str(base), str(runs[name]), "--out", str(tmp_path / f"sc_{name}"), "--device", "cpu"])
        graft.main([str(tmp_path / f"g_{name}"), "--base", str(base), "--add", str(runs[name]), "--sub", str(base)])
    assert_same(tensors(runs["plain"]), tensors(runs["hub"]))
    records = [json.loads((r / "metrics.json").read_text())["records"] for r in runs.values()]
    assert records[0] == records[1]
    assert_same(tensors(tmp_path / "sc_plain"), tensors(tmp_path / "sc_hub"))
    assert_same(tensors(tmp_path / "g_plain"), tensors(tmp_path / "g_hub"))
    # the graft of a sharded base mirrors its shards, by the index's names
    assert sorted(p.name for p in (tmp_path / "g_hub").glob("*.safetensors")) == \
        sorted(p.name for p in snap.glob("model-*.safetensors"))


# --- side files: regular files from inside the checkpoint, with a size cap ----------------------------------------

def linked_copy(plain, d, name, target):
    """A copy of `plain` whose side file `name` is a link to `target`."""
    d.mkdir()
    for f in plain.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / name).symlink_to(target)
    return d


@pytest.mark.parametrize("target, why", [("/dev/zero", "not a regular file"), ("SECRET", "outside")])
def test_a_side_file_linked_out_of_the_checkpoint_is_not_followed(dirs, small_json, tmp_path, target, why):
    plain, _ = dirs
    if target == "SECRET":
        target = tmp_path / "secret.txt"
        target.write_text("not for copying")
    d = linked_copy(plain, tmp_path / "ckpt", "LICENSE", target)
    assert why in one_line_error(train_main, d, small_json, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = tmp_path / "direct"
    out.mkdir()
    with pytest.raises(C.UserError, match=why):
        C.copy_side_files(d, out)
    assert not (out / "LICENSE").exists()


def test_a_hub_snapshots_linked_side_file_is_copied_and_a_huge_one_refused(dirs, tmp_path, monkeypatch):
    _, snap = dirs
    out = tmp_path / "out"
    out.mkdir()
    C.copy_side_files(snap, out)
    assert (out / "tokenizer.json").read_bytes() == (snap / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()
    monkeypatch.setattr(C, "SIDE_FILE_CAP", 1000)                          # tokenizer.json is larger
    with pytest.raises(C.UserError, match="more than a tokenizer.json can be"):
        C.copy_side_files(snap, tmp_path)


def test_a_shard_linked_outside_the_hub_repo_is_refused(dirs, tmp_path):
    _, snap = dirs
    d = tmp_path / "models--x--y" / "snapshots" / REV
    d.mkdir(parents=True)
    for f in snap.iterdir():                                              # the same links, now into another repo
        (d / f.name).symlink_to(f.resolve())
    with pytest.raises(C.UserError, match="outside"):
        C.safetensors_files(d)
