"""Checkpoint directories: find them, load them, save them; and the one way every output is written.

A checkpoint directory holds `config.json`, `*.safetensors` (or shards listed in `model.safetensors.index.json`)
and `tokenizer.json`: what `transformers` saves, so ours and theirs load each other's. `from_pretrained` builds
the model on the meta device and assigns the weights (gpt-fast's recipe): no second copy is ever allocated.
Every output is written through checkpoint_io/outputs.py (one rule: nothing lost).
"""
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from config import Config
from model import Transformer
from checkpoint_io.outputs import MARKER, UserError

DEFAULT_NAME = "smollm2-135m"      # the embedded default model (checkpoint_io/default_model.py)
# what a checkpoint directory carries besides its weights (copied from the source model when we write one);
# the license and notice files too: the Gemma terms require them with every copy of the weights or a derivative
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "LICENSE", "GEMMA_TERMS.html", "NOTICE")
SIDE_FILE_CAP = 100 * 2**20        # bytes: Gemma 3's tokenizer.json, the largest side file we know, is 33 MB


# --- finding and reading a checkpoint ---------------------------------------------------------------------

def resolve(name_or_path, revision=None) -> Path:
    """A checkpoint directory: an embedded model's cache, a local directory, or a hub snapshot (at `revision`: a
    branch, tag or commit; only a hub id has revisions)."""
    from checkpoint_io.default_model import EMBEDDED, embedded_checkpoint
    p = Path(name_or_path)
    if revision is not None and (str(name_or_path) in EMBEDDED or p.is_dir()):
        what = "the embedded default, converted from its GGUF" if str(name_or_path) in EMBEDDED else "a local directory"
        raise UserError(f"--revision {revision} with {name_or_path!r}, {what}: a revision selects a snapshot of a hub "
                        "id (owner/name); drop --revision, or pass the hub id")
    if str(name_or_path) in EMBEDDED:
        return embedded_checkpoint(str(name_or_path))
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


@contextmanager
def embedded_hint(name):
    """An error reading an embedded model's cache says the one command that rebuilds it."""
    try:
        yield
    except UserError as e:
        from checkpoint_io.default_model import EMBEDDED
        if str(name) not in EMBEDDED:
            raise
        raise UserError(f"{e}; the converted cache of {name} is damaged: rebuild it with "
                        f"`python -m checkpoint_io.default_model --model {name} --force`") from None


def read_json(f: Path, what="file"):
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:            # RecursionError: nested thousands deep
        raise UserError(f"cannot read {f} ({what}): {str(e)[:200]}; restore or re-download it") from None


def checkpoint_file(directory, name, what="file"):
    """`directory / name`, the one check on every file of a checkpoint we read or copy (config, tokenizer, shards,
    side files): `name` is a plain file name (a shard index names no "../x" or "/x"), and the file is a regular file
    stored inside the checkpoint. Inside means in the directory itself or, for a hub snapshot, in its repo folder:
    huggingface_hub keeps models--o--n/snapshots/<rev>/NAME as a link to ../../blobs/<sha>. None: no such file; a
    link elsewhere (another folder, /dev/zero) is a UserError."""
    directory = Path(directory)
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise UserError(f"{directory}: the {what} {name!r} is no plain file name; it may lead outside the checkpoint "
                        "directory: refused")
    f = directory / name
    if not f.exists() and not f.is_symlink():
        return None
    home = directory.resolve()
    if home.parent.name == "snapshots" and home.parent.parent.name.startswith("models--"):
        home = home.parent.parent                                 # the hub cache's repo folder: blobs/ and snapshots/
    target = f.resolve()
    if not target.is_file() or home not in target.parents:
        where = "not a regular file" if not target.is_file() else f"outside {home}"
        raise UserError(f"{f} leads to {target}, {where}: refused; put the file itself into the checkpoint directory")
    return f


def config_dict(path) -> dict:
    """The checkpoint's config.json as a dict; a directory without one is named for what it is."""
    f = checkpoint_file(path, "config.json", "config")
    if f is None:
        marker = read_json(Path(path) / MARKER) if (Path(path) / MARKER).is_file() else {}
        kind = marker.get("kind") if isinstance(marker, dict) else None
        what = f"a {kind} output of ours" if kind else "no checkpoint directory"
        raise UserError(f"{path} has no config.json, so it is {what}: pass a checkpoint (a directory train.py or "
                        f"graft.py wrote, a hub id, or {DEFAULT_NAME!r})")
    cfg = read_json(f, "config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{f} holds a JSON {type(cfg).__name__}, not an object of settings: restore or re-download it")
    return cfg


def load_config(path: Path) -> Config:
    f = Path(path) / "config.json"
    try:
        return Config.from_json(config_dict(path))
    except KeyError as e:                                         # a required field is absent
        raise UserError(f"{f} lacks the required key {e.args[0]!r}: a damaged or non-transformer config") from None
    except UserError:
        raise
    except ValueError as e:                                       # a wrong type or impossible value, by field
        raise UserError(f"{f}: {str(e).removeprefix('config.json: ')}") from None


def safetensors_files(path: Path):
    """The weight files of a checkpoint, sharded or not; each read only from inside it (checkpoint_file)."""
    path = Path(path)
    index = checkpoint_file(path, "model.safetensors.index.json", "shard index")
    if index is not None:
        idx = read_json(index, "shard index")
        if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
            raise UserError(f"{index} has no weight_map: a damaged shard index")
        files = []
        for name in sorted(set(map(str, idx["weight_map"].values()))):
            f = checkpoint_file(path, name, "shard")               # the name, not where the hub stores its bytes
            if f is None:
                raise UserError(f"{index} names the shard {name!r}, which {path} lacks: re-download the checkpoint")
            files.append(f)
        return files
    files = [checkpoint_file(path, f.name, "weight file") for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise UserError(f"{path} has no *.safetensors weights")
    return files


def open_shard(f):
    """safe_open of one weight file; a truncated or corrupt file is a UserError that names it."""
    try:
        return safe_open(f, framework="pt", device="cpu")
    except Exception as e:
        raise UserError(f"cannot read {f}: {e} (truncated or corrupt file? re-download it)") from None


# --- multimodal Gemma 3 (4B and larger): the text model beside a vision tower ---------------------------------

# Gemma3ForConditionalGeneration keeps its text model under a prefix, beside a SigLIP vision tower and a projector
# that we neither load nor write. Its two layouts (transformers' conversion_mapping.py, "llava"): the saved one, of
# Google's checkpoints and of save_pretrained (transformers 5.24 too), and the in-memory one of transformers >= 4.52,
# which a state dict saved directly holds (its head, if untied, is the top-level lm_head.weight)
TEXT_PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",   # saved
                 "model.language_model.": "model."}                                          # in memory
NOT_TEXT = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def multimodal(path) -> bool:
    """A multimodal Gemma 3 checkpoint: config.json's model_type "gemma3", the text model in its text_config."""
    return config_dict(path).get("model_type") == "gemma3"


def text_keys(sf, multimodal: bool):
    """(stored key, our name) for each weight of the text model in the open shard `sf`: the one place the
    multimodal names are mapped (weights(), train.reset_layers, graft.py). Another name of a multimodal checkpoint
    (neither vision nor prefixed: lm_head.weight, or a stray weight) passes unchanged, to be checked as any other."""
    for key in sf.keys():
        if multimodal and key.startswith(NOT_TEXT):
            continue
        old = next((p for p in TEXT_PREFIXES if multimodal and key.startswith(p)), None)
        yield key, TEXT_PREFIXES[old] + key[len(old):] if old else key


def weights(path: Path, cfg: Config, expected):
    """(name, tensor) for every weight of the checkpoint at `path`, each checked against `expected` (name ->
    tensor of the right shape, e.g. a meta model's state_dict): the one reader of from_pretrained and of
    run_setup/dist.py's sharded loading. A multimodal checkpoint gives its text model's weights, under our names."""
    mm = multimodal(path)
    for f in safetensors_files(path):
        try:
            with open_shard(f) as sf:
                for key, name in text_keys(sf, mm):
                    if name not in expected:
                        # tied checkpoints may still carry lm_head.weight; rotary caches are derived
                        if name == "lm_head.weight" and cfg.tie_embeddings or "rotary_emb" in name:
                            continue
                        raise UserError(f"{f.name}: unexpected weight {key!r} for a {cfg.model_type} model")
                    t = sf.get_tensor(key)
                    if t.shape != expected[name].shape:
                        raise UserError(f"{f.name}: {key} has shape {tuple(t.shape)}, "
                                        f"config.json implies {tuple(expected[name].shape)}")
                    yield name, check_finite(t, key, f)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {f}: {e} (truncated or corrupt file? re-download it)") from None


def check_finite(t, key, f):
    """`t`, after checking it holds no NaN or infinity: one such weight makes every score, rank and graft NaN
    with no other sign. One read of the tensor, far less than any use of it."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise UserError(f"{f}: the weight {key} holds NaN or infinite values (a diverged or damaged checkpoint): "
                        "use another checkpoint")
    return t


def from_pretrained(name_or_path, dtype=torch.float32, device="cpu", revision=None) -> Transformer:
    with embedded_hint(name_or_path):
        return _from_pretrained(resolve(name_or_path, revision), dtype, device)


def _from_pretrained(path, dtype, device) -> Transformer:
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
    with embedded_hint(name_or_path):
        return _load_tokenizer(resolve(name_or_path, revision))


def _load_tokenizer(path):
    from tokenizers import Tokenizer
    f = checkpoint_file(path, "tokenizer.json", "tokenizer")
    if f is None:
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


# --- saving a checkpoint ------------------------------------------------------------------------------------

# the line a copied NOTICE gains: the Gemma terms ask that modified files carry a notice that they were modified
MODIFIED = "Modified: the weights in this directory were finetuned or grafted by Extractive structures, compactly, from"


def copy_side_files(src, directory):
    """Copy the SIDE_FILES that checkpoint directory `src` has into `directory`, which receives weights modified
    from `src`'s: its NOTICE says so (once: a finetune of a finetune keeps the first line, which names the base),
    and a multimodal base's config.json becomes its text model's, as the text weights we write need."""
    src, directory = Path(src), Path(directory)
    for name in SIDE_FILES:
        f = checkpoint_file(src, name, "side file")               # regular files from inside the checkpoint only
        if f is not None and f.stat().st_size > SIDE_FILE_CAP:
            raise UserError(f"{f} is {f.stat().st_size / 2**20:.0f} MiB, more than a {name} can be "
                            f"({SIDE_FILE_CAP // 2**20} MiB): a damaged checkpoint; restore or re-download it")
        if f is not None:
            shutil.copy(f, directory / name)
    if multimodal(src):
        cfg = config_dict(src)
        text = {**cfg.get("text_config", {}), "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                "tie_word_embeddings": load_config(src).tie_embeddings}     # multimodal: the top-level flag ties
        (directory / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    notice = directory / "NOTICE"
    if notice.exists() and MODIFIED not in notice.read_text():
        notice.write_text(f"{notice.read_text().rstrip()}\n\n{MODIFIED} {src}.\n")


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
