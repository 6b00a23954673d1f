"""Checkpoint directories: find them, load them, save them; and the one way every output is written.

A checkpoint directory holds `config.json`, `*.safetensors` (or shards listed in `model.safetensors.index.json`)
and `tokenizer.json`: what `transformers` saves, so ours and theirs load each other's. `from_pretrained` builds
the model on the meta device and assigns the weights (gpt-fast's recipe): no second copy is ever allocated.

Outputs (checkpoints, scores, grafts, reports) follow one rule, "nothing lost":
  - every output is written into a fresh hidden sibling (`.NAME.tmp-PID-XXXX`) and renamed into place, so a killed
    run leaves the old output or the new one, never a mix;
  - an existing output is replaced only if it is one of ours: a directory whose marker file (MARKER) says it is
    the same kind of output and lists every entry it holds. Anything else (a user's directory, a file, a
    checkpoint with notes added) stops the run with a one-line error before any work, unless `overwrite=True`;
  - leftovers of killed runs (temporaries, a displaced old output) are cleaned, or put back, the next time.
"""
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import Config, Transformer

DEFAULT_NAME = "smollm2-135m"      # the embedded default model (default_model.py)
# what a checkpoint directory carries besides its weights (copied from the source model when we write one)
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json")
MARKER = "extractive-structures.json"   # in every output directory we write: {"kind", "files"}


class UserError(ValueError):
    """An error the user can fix (a path, a file, an argument): scripts print it as one line, no traceback."""


# --- finding and reading a checkpoint ---------------------------------------------------------------------

def resolve(name_or_path, revision=None) -> Path:
    """A checkpoint directory: the default model's cache, a local directory, or a hub snapshot."""
    if str(name_or_path) == DEFAULT_NAME:
        from default_model import default_checkpoint
        return default_checkpoint()
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise UserError(f"no checkpoint directory at {name_or_path!r} (and it is not a hub id 'owner/name'): "
                        f"pass a directory with config.json, or {DEFAULT_NAME!r}")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:
        raise UserError(f"{name_or_path!r} is no local directory, and the Hugging Face hub did not provide it "
                        f"({type(e).__name__}): check the path, or the id and network") from None


def read_json(f: Path, what="file"):
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {f} ({what}): {e}; restore or re-download it") from None


def load_config(path: Path) -> Config:
    f = Path(path) / "config.json"
    if not f.exists():
        raise UserError(f"{path} has no config.json: not a checkpoint directory")
    try:
        return Config.from_json(read_json(f, "config.json"))
    except KeyError as e:                                         # a required field is absent
        raise UserError(f"{f} lacks the required key {e.args[0]!r}: a damaged or non-transformer config") from None


def safetensors_files(path: Path):
    """The weight files of a checkpoint, sharded or not; shards are read only from inside the directory."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        idx = read_json(index, "shard index")
        if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
            raise UserError(f"{index} has no weight_map: a damaged shard index")
        files = []
        for name in sorted(set(idx["weight_map"].values())):
            f = (path / str(name)).resolve()
            if f.parent != path.resolve():                       # "../x.safetensors" or an absolute path
                raise UserError(f"{index} names the shard {name!r} outside the checkpoint directory: refused")
            files.append(f)
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights")
    return files


def weights(path: Path, cfg: Config, expected):
    """(name, tensor) for every weight of the checkpoint at `path`, each checked against `expected` (name ->
    tensor of the right shape, e.g. a meta model's state_dict): the one reader of from_pretrained and of dist.py's
    sharded loading."""
    for f in safetensors_files(path):
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key not in expected:
                        # tied checkpoints may still carry lm_head.weight; rotary caches are derived
                        if key == "lm_head.weight" and cfg.tie_embeddings or "rotary_emb" in key:
                            continue
                        raise UserError(f"{f.name}: unexpected weight {key!r} for a {cfg.model_type} model")
                    t = sf.get_tensor(key)
                    if t.shape != expected[key].shape:
                        raise UserError(f"{f.name}: {key} has shape {tuple(t.shape)}, "
                                        f"config.json implies {tuple(expected[key].shape)}")
                    yield key, t
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {f}: {e} (truncated or corrupt file? re-download it)") from None


def from_pretrained(name_or_path, dtype=torch.float32, device="cpu", revision=None) -> Transformer:
    path = resolve(name_or_path, revision)
    cfg = load_config(path)
    with torch.device("meta"):                                    # build without allocating, then assign
        model = Transformer(cfg)
    expected = model.state_dict()
    # copy=True: a tensor mapped from the file would be faulted in page by page, copy-on-write, at the first
    # optimizer step; an owned copy costs less, once
    state = {key: t.to(device=device, dtype=dtype, copy=True) for key, t in weights(path, cfg, expected)}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{path}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    model.source = path
    return model.eval()


def load_tokenizer(name_or_path, revision=None):
    from tokenizers import Tokenizer
    path = resolve(name_or_path, revision)
    f = path / "tokenizer.json"
    if not f.exists():
        raise UserError(f"{path} has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:                                        # tokenizers raises a plain Exception
        raise UserError(f"cannot read {f}: {str(e).splitlines()[0][:200]} (damaged? restore or re-download "
                        "it)") from None


def config_diff(a: Config, b: Config):
    """Names of the fields where two architectures differ (empty: the same architecture)."""
    return [f for f in a.__dataclass_fields__ if getattr(a, f) != getattr(b, f)]


def check_same_base(paths):
    """The checkpoints share one architecture and one tokenizer (finetunes of one base model), else a UserError
    that names the difference. Used by scores.py (W and W') and graft.py (A, B, C)."""
    paths = [Path(p) for p in paths]
    cfgs = [load_config(p) for p in paths]
    vocabs = [load_tokenizer(p).get_vocab() for p in paths]
    for p, c, v in zip(paths[1:], cfgs[1:], vocabs[1:]):
        if c != cfgs[0]:
            raise UserError(f"{p} and {paths[0]} have different architectures ({', '.join(config_diff(c, cfgs[0]))}):"
                            " use checkpoints finetuned from one base model")
        if v != vocabs[0]:
            raise UserError(f"{p} and {paths[0]} have different tokenizers (tokenizer.json vocabularies differ): "
                            "use checkpoints finetuned from one base model")


# --- writing outputs: one rule for every file and directory ----------------------------------------------

def _tmp_name(path: Path, tag):
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                      # someone else's process: alive
        return True
    return True


def clean_leftovers(out, log=print):
    """Remove the temporaries of killed runs beside `out`; put a displaced old output back if the new one never
    arrived (killed between the two renames of publish). Temporaries of live processes are left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.glob(f".{out.name}.*-*-*")):
        tag, pid = p.name[len(out.name) + 2:].split("-")[:2]
        if tag not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if tag == "old" and not out.exists() and not out.is_symlink():
            os.replace(p, out)
            log(f"note: {out} was displaced by a killed run; put back")
        else:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            log(f"note: removed {p.name}, left by a killed run")


def is_ours(out: Path, kind):
    """`out` is a directory we wrote as `kind`, holding nothing but the files its marker lists."""
    marker = out / MARKER
    if out.is_symlink() or not out.is_dir() or not marker.is_file():
        return False
    try:
        m = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return m.get("kind") == kind and {p.name for p in out.iterdir()} <= set(m.get("files", [])) | {MARKER}


def check_output(out, kind, overwrite=False, inputs=(), log=print):
    """Before any work: `out` can be written, and replacing it loses nothing of the user's. Returns the Path."""
    out = Path(out)
    where = out.resolve()
    cwd = Path.cwd().resolve()
    if where == Path(where.anchor) or where == Path.home().resolve() or where == cwd or where in cwd.parents:
        raise UserError(f"refusing to write the output {out} over {where}, which holds this run's or your files: "
                        "give a new path")
    for i in inputs:
        i = Path(i).resolve()
        if i == where or where in i.parents:
            raise UserError(f"the output {out} would replace the input {i}: give another output path")
    clean_leftovers(out, log)
    empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())    # replacing it loses nothing
    if (out.exists() or out.is_symlink()) and not (overwrite or empty or is_ours(out, kind)):
        what = "a file" if out.is_file() else "not a " + kind + " output of ours" if not (out / MARKER).exists() \
            else f"a {kind} output with files added by hand"
        raise UserError(f"{out} exists and is {what}: choose another output path, or pass --overwrite to replace "
                        "it whole")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write the output {out}: {e.strerror or e}") from None
    return out


def _publish(tmp: Path, out: Path):
    """Rename the finished `tmp` over `out`: two renames, the old output kept aside until the new one is in."""
    old = None
    if out.exists() or out.is_symlink():
        old = _tmp_name(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextmanager
def atomic_dir(out, kind, overwrite=False, inputs=(), log=print):
    """Yields a fresh hidden directory beside `out` to fill; when the block ends without error it gets the marker
    and replaces `out` whole (see the module docstring for when that is allowed); otherwise it is removed."""
    out = check_output(out, kind, overwrite, inputs, log)
    tmp = _tmp_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")
        check_output(out, kind, overwrite, inputs, log)           # again: the user may have made it meanwhile
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def work_dir(path, kind):
    """A directory that collects an experiment's stages, kept and reused across runs (never replaced whole). It
    is marked as ours when made; an existing directory that is not ours and not empty is refused."""
    p = Path(path)
    marker = p / MARKER
    if p.exists() and not p.is_dir():
        raise UserError(f"{p} exists and is a file: choose another work directory")
    if p.is_dir() and any(p.iterdir()) and not marker.is_file():
        raise UserError(f"{p} exists and is not a work directory of ours: choose another one")
    try:
        p.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            write_atomic(marker, json.dumps({"kind": kind, "files": "stages, kept across runs"}) + "\n")
    except OSError as e:
        raise UserError(f"cannot write the work directory {p}: {e.strerror or e}") from None
    return p


def write_atomic(path, content):
    """Write one file: `content` is text, bytes, or a function that writes the file at the path it is given
    (safetensors' save_file, a matplotlib figure's savefig). Written beside `path`, then renamed over it."""
    path = Path(path)
    tmp = _tmp_name(path, "tmp")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    """Strict JSON (no NaN or Infinity, which strict readers reject), atomically."""
    write_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def save_figure(fig, path):
    """A matplotlib figure as PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    write_atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


# --- saving a checkpoint ------------------------------------------------------------------------------------

def copy_side_files(src, directory):
    """Copy the SIDE_FILES that checkpoint directory `src` has into `directory`."""
    src, directory = Path(src), Path(directory)
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy(src / name, directory / name)


def write_checkpoint(model: Transformer, directory, state=None, shard_bytes=5 * 10**9):
    """config.json and tokenizer files (copied from the model's source) and the weights (in the model's dtype) into
    an existing directory: model.safetensors, or, above `shard_bytes`, model-0000i-of-0000n.safetensors and
    model.safetensors.index.json, as transformers writes them. `state`: the full state dict to write instead of
    the model's own (dist.full_state_dict of a sharded model)."""
    directory = Path(directory)
    copy_side_files(model.source, directory)
    state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    size = lambda t: t.numel() * t.element_size()
    shards, filled = [[]], 0                                      # names, in order, cut before shard_bytes
    for k in state:
        if shards[-1] and filled + size(state[k]) > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(k)
        filled += size(state[k])
    if len(shards) == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    n, weight_map = len(shards), {}
    for i, names in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k] for k in names}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in names})
    index = {"metadata": {"total_size": sum(size(t) for t in state.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
