"""Peak memory of train.py's training step at OLMo-7B's widths, measured, and its extrapolation to whole models.

    python bench/memory.py [--layers 1 2 4] [--steps 3] [--device cpu]

For each of train.py's memory options (fp32 Adam, the default; --moments bf16; --offload-optimizer) and each layer
count, a fresh process builds a random-weight model with OLMo-7B-0424's exact widths (hidden 4096, MLP 11008, 32
heads, vocab 50304, parameter-free LayerNorm, untied head) but only that many layers, and takes real training steps
of train.py's code (answer_loss, AdamInBackward inside backward, the blocks trained, embeddings and head frozen) on a
batch of 8 facts-like sequences of 10 tokens. It reports its peak: CUDA's max_memory_allocated on a GPU, else the
peak resident memory (VmHWM). With train.py --offload-optimizer on a CPU the host is the device, so the table's
"device" column subtracts the bytes of Adam's moments held on the host, counted from the optimizer's own tensors.
A least-squares line bytes = a + b * layers per option gives b (bytes per layer); the extrapolation is
    a - 4 * frozen parameters here  +  4 * frozen parameters of the target  +  b / block parameters here * block
    parameters of the target,
i.e. per-layer bytes scaled by parameter count (activations at these batch sizes are a few MB), against 80 GB.
Rows "FSDP2 xN" divide the block share by N and add one block's fp32 weights and gradients (its all-gather):
derived, not measured.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):                                     # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train                                                      # noqa: E402
from config import Config                                         # noqa: E402
from model import Transformer                                     # noqa: E402
from run_setup.optim import local                                           # noqa: E402
from run_setup.progress import progress                                     # noqa: E402

OLMO_7B = {"model_type": "olmo", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 50304, "num_hidden_layers": 32, "tie_word_embeddings": False,
           "max_position_embeddings": 4096, "rope_theta": 10000.0, "clip_qkv": None}
# targets of the extrapolation: (hidden, MLP, heads, kv heads, head dim, vocab, layers, tied)
TARGETS = {"OLMo-7B": (4096, 11008, 32, 32, 128, 50304, 32, False),
           "Llama 3 8B": (4096, 14336, 32, 8, 128, 128256, 32, False),
           "Gemma 2 9B": (3584, 14336, 16, 8, 256, 256000, 42, True),
           "Llama 3 70B": (8192, 28672, 64, 8, 128, 128256, 80, False)}
OPTIONS = {"fp32": {}, "bf16 moments": {"moments": "bf16"}, "offload": {"offload_optimizer": True}}
GB = 1e9


def block_params(D, F, H, K, E):
    """Weights of one block: q, o (D x H E), k, v (D x K E), gate, up, down (D x F); norms (at most 4 D) ignored."""
    return 2 * D * H * E + 2 * D * K * E + 3 * D * F


def frozen_params(D, V, tied):
    return D * V * (1 if tied else 2)


def peak_bytes(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:                          # VmHWM: the peak resident set, in kB
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024


def worker(n_layers, option, steps, device):
    """One measurement in this process: build, train `steps` steps, print {peak, host_state, step times} as JSON."""
    torch.manual_seed(0)
    cfg = Config.from_json({**OLMO_7B, "num_hidden_layers": n_layers})
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)                                     # random weights, fp32 master copies
    s = train.Settings(lr=3e-6, device=device, **OPTIONS[option])
    names = set(train.trainable_names(model))
    params = [p for n, p in model.named_parameters() if n in names]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (8, 10), generator=g).to(device)   # (B, T): 8 facts of 10 tokens
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]                                  # the answer: the last 3 tokens
    opt = train.AdamInBackward(params, s.lr, s.moments, s.offload_optimizer)
    times = []
    for step in progress(range(steps), f"{option}, {n_layers} layers: training steps"):   # train_phase's loop body
        t0 = time.time()
        opt.start_step(s.lr * train.lr_factor(step, steps))
        with train.autocast(s):
            loss = train.answer_loss(model, ids, mask, labels)
        loss.backward()                                           # Adam steps every block parameter in here
        loss.item()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    opt.remove()
    host = sum(m.nbytes + v.nbytes for m, v in opt.state.values()) if s.offload_optimizer else 0
    print(json.dumps({"peak": peak_bytes(device), "host_state": host, "times": times,
                      "block_params": sum(local(p).numel() for p in params)}))


def fit(xs, ys):
    """Least squares y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4], help="layer counts to measure")
    p.add_argument("--steps", type=int, default=3, help="training steps per measurement (the peak is reached "
                                                        "in the first, when Adam's moments are first written)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per measurement")
    p.add_argument("--worker", nargs=2, metavar=("LAYERS", "OPTION"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.worker:
        return worker(int(a.worker[0]), a.worker[1], a.steps, a.device)
    D, F, H, K, E, V, L, tied = TARGETS["OLMo-7B"]
    frozen_here = frozen_params(D, V, tied)
    res = {}
    for option in OPTIONS:
        for n in a.layers:                                        # one fresh process per measurement
            out = subprocess.run([sys.executable, __file__, "--worker", str(n), option, "--steps", str(a.steps),
                                  "--device", a.device, "--threads", str(a.threads)],
                                 stdout=subprocess.PIPE, text=True, check=True).stdout   # its progress: stderr
            r = json.loads(out.strip().splitlines()[-1])
            r["device_peak"] = r["peak"] - r["host_state"]
            res[option, n] = r
            print(f"measured {option:13s} {n} layers: peak {r['peak'] / GB:6.2f} GB, device {r['device_peak'] / GB:6.2f}"
                  f" GB, median step {statistics.median(r['times'][1:] or r['times']):.2f} s", flush=True)
    per_layer_params = res["fp32", a.layers[0]]["block_params"] / a.layers[0]
    where = "CUDA max_memory_allocated" if torch.device(a.device).type == "cuda" else "peak RSS (VmHWM)"
    print(f"\nOLMo-7B widths, {a.layers} layers, {where}; fit bytes = a + b * layers; 80 GB = 80e9 bytes")
    print(f"{'option':14s} {'GB/layer':>8s} {'const GB':>8s} " + " ".join(f"{t:>12s}" for t in TARGETS)
          + "  fits 80 GB (OLMo-7B)  step time vs fp32")
    fp32_time = statistics.median(res["fp32", max(a.layers)]["times"][1:] or res["fp32", max(a.layers)]["times"])
    for option in OPTIONS:
        a0, b = fit(a.layers, [res[option, n]["device_peak"] for n in a.layers])
        overhead = a0 - 4 * frozen_here
        cells = []
        olmo = None
        for t, (D_, F_, H_, K_, E_, V_, L_, tied_) in TARGETS.items():
            est = overhead + 4 * frozen_params(D_, V_, tied_) + b / per_layer_params * block_params(D_, F_, H_, K_, E_) * L_
            olmo = est if olmo is None else olmo
            cells.append(f"{est / GB:9.1f} GB")
        times = res[option, max(a.layers)]["times"]
        ratio = statistics.median(times[1:] or times) / fp32_time
        print(f"{option:14s} {b / GB:8.3f} {a0 / GB:8.2f} " + " ".join(f"{c:>12s}" for c in cells)
              + f"  {'yes' if olmo < 80 * GB else 'no':>6s} ({olmo / GB:.1f} GB)      {ratio:.2f}x")
    # FSDP2 over N GPUs, derived from the fp32 fit: the block share / N + one block all-gathered (weights + grads)
    a0, b = fit(a.layers, [res["fp32", n]["device_peak"] for n in a.layers])
    overhead = a0 - 4 * frozen_here
    for N in (2, 4, 8):
        cells = []
        for t, (D_, F_, H_, K_, E_, V_, L_, tied_) in TARGETS.items():
            bp = block_params(D_, F_, H_, K_, E_)
            est = overhead + 4 * frozen_params(D_, V_, tied_) + b / per_layer_params * bp * L_ / N + 8 * bp
            cells.append(f"{est / GB:9.1f} GB")
        print(f"{'FSDP2 x' + str(N) + ' fp32':14s} {'':8s} {'':8s} " + " ".join(f"{c:>12s}" for c in cells)
              + "  (per GPU; derived)")


if __name__ == "__main__":
    main()
