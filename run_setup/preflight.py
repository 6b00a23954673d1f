"""Inputs checked before any heavy work: a mistake in what a script is given stops it within seconds, with one
line, before a model loads or an output is touched (the outputs themselves: checkpoint_io/outputs.py).

  - what a run reads, so that no output replaces it (inputs);
  - W and W' of scores.py and exact.py: two checkpoints, W' not an ancestor of W by the provenance our runs record
    (metrics.json's base_model, graft.json's base), and the dataset to score (pair);
  - answers that the mean rank cannot tell apart (their first tokens collide), from the tokenizer alone, and the
    chance level each split's mean rank is read against (answers).
"""
from pathlib import Path

import data
from checkpoint_io.checkpoint import UserError, config_dict, read_json, resolve


def inputs(checkpoints, dataset=None):
    """The paths a run reads: its checkpoint directories (resolved) and its dataset file (a built-in name is no
    file). outputs.check_output refuses an output that would replace, hold or sit inside any of them."""
    return [Path(c) for c in checkpoints] + ([Path(dataset)] if dataset and str(dataset) not in data.DATASETS else [])


def recorded(ckpt):
    """ckpt's own record of what it was made from, as a resolved directory: train.py's and graft.py's stages write
    metrics.json's base_model, `graft.py OUT --base A` writes graft.json (A); None when it records neither."""
    for name, key in (("metrics.json", "base_model"), ("graft.json", "base_dir")):
        f = Path(ckpt) / name
        meta = read_json(f, name) if f.is_file() else None
        if isinstance(meta, dict) and isinstance(meta.get(key), str):
            return Path(meta[key]).resolve()
    return None


def ancestors(ckpt, most=50):
    """The checkpoints `ckpt` descends from, nearest first, by their records (a loop or a missing one ends it)."""
    out, p = [], recorded(ckpt)
    while p is not None and p not in out and len(out) < most and p.is_dir():
        out.append(p)
        p = recorded(p)
    return out


def pair(ckpt_a, ckpt_b, dataset=None, seed=None):
    """W = ckpt_a and W' = ckpt_b of scores.py and exact.py, checked: each a checkpoint directory, not the same one
    (every score would be 0), and W' not an ancestor of W (swapped: W' must be the finetune). Returns the dataset
    and seed to score: those given, else those in ckpt_b's metrics.json (seed 0 if it names none)."""
    a, b = resolve(ckpt_a), resolve(ckpt_b)
    for d in (a, b):
        config_dict(d)                                            # "X is no checkpoint directory", said first
    if a.resolve() == b.resolve():
        raise UserError(f"W ({ckpt_a}) and W' ({ckpt_b}) are the same checkpoint, so every score would be 0: pass "
                        "the base model first and its finetune second, e.g. `smollm2-135m runs/first_hop`")
    if b.resolve() in ancestors(a):
        raise UserError(f"W and W' are swapped: {ckpt_a} records that it descends from {ckpt_b}: pass the base "
                        f"first, `{ckpt_b} {ckpt_a}`")
    meta = read_json(b / "metrics.json", "metrics.json") if (b / "metrics.json").is_file() else {}
    args = meta.get("args") if isinstance(meta, dict) and isinstance(meta.get("args"), dict) else {}
    dataset = dataset or args.get("dataset")
    if dataset is None:
        raise UserError(f"no --dataset given, and {ckpt_b} records none (it has no metrics.json of train.py's): "
                        "pass --dataset")
    return dataset, seed if seed is not None else args.get("seed", 0)


def answers(tok, splits, log=print, what=""):
    """Each split's answers have distinct first tokens under `tok` (data.candidate_ids: the mean rank and the reward
    read only the first token), checked before a model loads. Returns {split: chance}, the mean rank of a model
    that knows nothing: (n - 1) / 2 for n distinct answers (ties count half, data.py), 9.5 for the built-in
    datasets' 20; logged, as `what` (a phase's name, say) followed by the numbers."""
    chance = {}
    for name, examples in splits.items():
        found, _, _ = data.candidates(tok, examples)              # a collision: one line naming both answers
        chance[name] = (len(found) - 1) / 2
    log(f"{what}chance mean rank " + ", ".join(f"{k} {v:g} ({2 * v + 1:.0f} answers)" for k, v in chance.items()))
    return chance
