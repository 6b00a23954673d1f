"""Finetune a pretrained LM on facts and track the mean rank of facts and implications (paper Sec. 5.1, 5.3, 6.1).

    python train.py --dataset first_hop                      # runs/first_hop: checkpoint + metrics.json + ranks.png
    python train.py --dataset second_hop --freeze early --freeze-when pre
    python train.py --dataset daxwug --order facts_first     # continued pretraining, then finetuning on test facts

Adam (0.9, 0.999, eps 1e-8, no weight decay), batch 8, 8 epochs, 10% warmup then linear decay, cross-entropy on
the answer tokens only. By default only the transformer blocks train (attention and MLP projections and their
norms); token embeddings, the final norm and the output head stay frozen, as in the paper's OLMo runs, so a new
fact has to live in the components the scores measure. Master weights are fp32; `--dtype bfloat16` runs the
matmuls in bf16 (autocast, and a bf16 copy of the frozen output head) with logits, loss and ranks in fp32.
"""
import argparse
import ctypes
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

import data
from model import DEFAULT_NAME, atomic_dir, from_pretrained, load_tokenizer, safetensors_files, write_checkpoint

EARLY_FRACTION = 0.75      # Table 2: "early" = the first 75% of the layers, rounded half up (30 -> 23, 32 -> 24)


# --- what trains ----------------------------------------------------------------------------------

def split_layers(n_layers, which):
    """Indices of the early (first round(0.75 L)) or late (the rest) layers."""
    n_early = math.floor(EARLY_FRACTION * n_layers + 0.5)
    return list(range(n_early)) if which == "early" else list(range(n_early, n_layers))


def default_lr(n_params):
    """The paper's 3e-6 for 7B checkpoints; small models need a larger rate (REFERENCE.md)."""
    if n_params >= 3e9:
        return 3e-6
    if n_params >= 1e9:
        return 3e-5
    return 3e-4


def trainable_names(model, train_all=False, frozen_layers=()):
    """Parameter names that train: the blocks (minus frozen layers), plus embeddings, final norm and head
    with `train_all`."""
    skip = tuple(f"model.layers.{i}." for i in frozen_layers)
    names = []
    for name, _ in model.named_parameters():
        in_block = name.startswith("model.layers.")
        if (in_block or train_all) and not name.startswith(skip):
            names.append(name)
    return names


def reset_layers(model, layers):
    """Copy the base checkpoint's weights of `layers` back into `model` (the "post" freeze of Table 2),
    read tensor by tensor from its safetensors so that no second model is held in memory."""
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    params = dict(model.named_parameters())
    done = set()
    with torch.no_grad():
        for f in safetensors_files(Path(model.source)):
            with safe_open(f, framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key.startswith(prefixes):
                        params[key].copy_(sf.get_tensor(key))
                        done.add(key)
    missing = {n for n in params if n.startswith(prefixes)} - done
    if missing:
        raise ValueError(f"{model.source}: base weights not found for {sorted(missing)[:3]}")


# --- the loss, the schedule, the evaluation ------------------------------------------------------------

def answer_loss(model, ids, mask, labels, head=None):
    """Mean cross-entropy over the answer tokens of a right-padded batch; the output head runs only at the
    positions that predict an answer token. ids, mask, labels (B, T). `head`: a bf16 copy of the frozen head
    (bf16_head) for bf16 training; without it the head's matmul runs in fp32. Logits and loss are fp32.

    The last column is never fed to the model: it holds each longest example's final token (or padding), which
    predicts nothing, and under causal attention no earlier position sees it. Dropping it changes no loss or
    gradient and saves 1/T of the work (T ~ 9 for the paper's facts)."""
    h = model.hidden(ids[:, :-1], mask[:, :-1])                   # (B, T-1, D): position t predicts token t + 1
    target = labels[:, 1:]                                        # (B, T-1)
    at = target != -100
    h_at = h[at]                                                  # (M, D), M = answer tokens in the batch
    with torch.autocast(ids.device.type, enabled=False):
        if head is None:
            logits = model.logits(h_at.float())                   # (M, V)
        else:
            logits = model.logits(h_at.to(head.dtype), head)      # (M, V) fp32, from a bf16 matmul
        return F.cross_entropy(logits, target[at])


def bf16_head(model, dtype):
    """A bf16 copy of the output head for the training loss when matmuls run in bf16 (`dtype`, --dtype) and the
    head is frozen (the default), else None. Made once: autocast would cast the frozen (V, D) matrix anew at every step,
    and the head's two fp32 matmuls per step (logits, and their gradient) read 113 MB each for the default
    model: 0.03 s of a 0.38 s step on a 2-core CPU, against 0.01 s in bf16."""
    w = model.head_weight()
    if dtype != "bfloat16" or w.requires_grad:
        return None
    return w.detach().to(torch.bfloat16)


class AdamInBackward:
    """Adam (0.9, 0.999, eps 1e-8, no weight decay) that updates each parameter inside `loss.backward()`, as soon
    as its gradient is complete, and frees that gradient at once (PyTorch's recipe "fuse the optimizer step into
    the backward pass"). Adam treats every parameter on its own and we clip no norm, so the update is exactly that
    of one Adam over all parameters (tested); but the gradients are never all held at once (the default model:
    425 MB less; a 7B model: 28 GB less), and each one is used while it is still in cache.

        opt = AdamInBackward(params, lr)
        opt.start_step(lr_now); loss.backward()  # the step happens here
        opt.remove()                             # at the end of the phase: unhook

    The update of step t (Kingma & Ba 2015, Algorithm 1), for each parameter p with gradient g:
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    On CPU and CUDA it runs as PyTorch's fused Adam kernel (the one torch.optim.Adam(fused=True) calls), one call
    a parameter, all sharing one step count t: the functional torch.optim.adam.adam costs ~20 us of bookkeeping a
    call and keeps a count per parameter, 6 ms of a 0.35 s step over the default model's 270 tensors (measured).
    Elsewhere it runs the three lines above as written (`_adam_by_hand`)."""

    betas, eps = (0.9, 0.999), 1e-8

    def __init__(self, params, lr):
        self.lr = lr
        self.fused = all(p.device.type in ("cpu", "cuda") for p in params)   # where PyTorch's fused kernel exists
        self.state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in params}   # Adam's moments m and v
        self.steps = {d: torch.zeros((), dtype=torch.float32, device=d)     # t, one tensor per device
                      for d in {p.device for p in params}}
        self.hooks = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def start_step(self, lr):
        """Call once before each backward(): the learning rate of this step, and t += 1."""
        self.lr = lr
        for t in self.steps.values():
            t.add_(1)                                             # in place: the fused kernel reads this tensor

    def _step(self, p):
        m, v = self.state[p]
        t = self.steps[p.device]
        if self.fused:
            torch._fused_adam_([p], [p.grad], [m], [v], [], [t], lr=self.lr, beta1=self.betas[0],
                               beta2=self.betas[1], weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)
        else:
            self._adam_by_hand(p, p.grad, m, v, t.item())
        p.grad = None

    @torch.no_grad()
    def _adam_by_hand(self, p, g, m, v, t):
        b1, b2 = self.betas
        m.lerp_(g, 1 - b1)                                        # m = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)                   # v = b2 v + (1 - b2) g^2
        denom = (v / (1 - b2 ** t)).sqrt_().add_(self.eps)
        p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** t))

    def remove(self):
        for h in self.hooks:
            h.remove()


def device_name(name):
    """--device: a name torch accepts (cpu, cuda, cuda:1, ...), checked when the arguments are parsed."""
    try:
        torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    return name


def cpu_count():
    """The cores this process may use (Linux: its affinity mask; macOS has no such call)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                       # mallopt's parameters, from glibc's malloc.h


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS. By default it serves
    blocks above a (self-adjusting) threshold with fresh mmap'ed pages and trims its heap whenever the memory free
    at its top passes twice that threshold; a training step frees and allocates again the same few hundred MB
    (the bf16 weight casts, the weight gradients), so every step faulted 3000-4500 pages back in, each zeroed by
    the kernel: 0.02-0.05 s of a 0.35-0.40 s bf16 step on the default model (measured, 2-core CPU, separate
    processes). With blocks up to 32 MB (glibc's largest mmap threshold) from the heap and trimming only above
    1 GB, a step takes 0-100 faults. The peak memory is the same; only what was freed is held until the process
    ends. CPU only, and only where the C library is glibc (Linux); elsewhere a no-op."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt                # glibc only
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


def autocast(args):
    """The one dtype policy: bf16 matmuls under autocast when asked; weights stay fp32."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def lr_factor(step, total, warmup_frac=0.1, constant=False):
    """Linear warmup over the first 10% of the steps, then linear decay towards 0 (paper Sec. 5.1)."""
    if constant:
        return 1.0
    warm = max(1, round(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / (total - warm + 1))          # peak at the last warmup step, then down


def evaluate(model, tok, evals, args):
    model.eval()
    with autocast(args):
        return {k: data.mean_rank(model, tok, ex, args.eval_batch_size) for k, ex in evals.items()}


@torch.no_grad()
def dataset_loss(model, batches, args, head=None):
    with autocast(args):
        losses = [answer_loss(model, *b, head=head).item() for b in batches]
    return sum(losses) / len(losses)


def train_phase(model, tok, examples, evals, params, args, phase, log):
    """One phase: fresh Adam and schedule over `examples`, evaluating `evals` before and after every epoch.
    Returns the records {"phase", "epoch", "loss", "fact_mean_rank", "impl_mean_rank"}."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in data.encode_examples(tok, examples))   # (N, T) each
    N, B = len(examples), args.batch_size
    steps_per_epoch = math.ceil(N / B)
    total = args.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(args.seed)               # reshuffled every epoch, reproducibly
    head = bf16_head(model, args.dtype)

    def batch(rows):
        T = int(mask[rows].sum(1).max())                          # trim padding to the batch's longest
        return ids[rows, :T], mask[rows, :T], labels[rows, :T]

    def record(epoch, loss, t0):
        ranks = evaluate(model, tok, evals, args)
        r = {"phase": phase, "epoch": epoch, "loss": loss,
             "fact_mean_rank": ranks["facts"], "impl_mean_rank": ranks["implications"]}
        log(f"{phase:>15} epoch {epoch:2d}/{args.epochs}  loss {loss:7.4f}  fact rank {r['fact_mean_rank']:5.2f}"
            f"  impl rank {r['impl_mean_rank']:5.2f}  ({time.time() - t0:5.1f} s)")
        return r

    t0 = time.time()
    # epoch 0: the loss of the untrained model on the whole training set
    records = [record(0, dataset_loss(model, [batch(torch.arange(i, min(i + B, N), device=device))
                                              for i in range(0, N, B)], args, head), t0)]
    opt, step = AdamInBackward(params, args.lr), 0                # a fresh Adam for every phase
    try:
        for epoch in range(1, args.epochs + 1):
            model.train()
            perm = torch.randperm(N, generator=gen).to(device)
            losses = []
            for i in range(0, N, B):
                opt.start_step(args.lr * lr_factor(step, total, constant=args.constant_lr))
                with autocast(args):
                    loss = answer_loss(model, *batch(perm[i:i + B]), head=head)
                loss.backward()                                   # Adam updates every parameter in here
                step += 1
                losses.append(loss.item())
            records.append(record(epoch, sum(losses) / len(losses), t0))   # loss: the mean over the epoch's batches
    finally:
        opt.remove()
    return records


# --- output -----------------------------------------------------------------------------------------------

def check_writable(out):
    """Fail before training, not after, when --out cannot be written."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise OSError(f"cannot write --out {out}: {e.strerror or e}") from None
    if out.exists() and not out.is_dir():
        raise OSError(f"--out {out} exists and is not a directory")


def plot(records, path, title):
    """Fact and implication mean rank against epoch, one panel per phase (paper Fig. 2 / Fig. 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    phases = list(dict.fromkeys(r["phase"] for r in records))
    fig, axes = plt.subplots(1, len(phases), figsize=(4 * len(phases), 3.2), squeeze=False, sharey=True)
    for ax, ph in zip(axes[0], phases):
        rs = [r for r in records if r["phase"] == ph]
        ax.plot([r["epoch"] for r in rs], [r["fact_mean_rank"] for r in rs], "o-", label="facts")
        ax.plot([r["epoch"] for r in rs], [r["impl_mean_rank"] for r in rs], "s-", label="implications")
        ax.set(title=ph, xlabel="epoch")
    axes[0][0].set(ylabel="mean rank (lower is better)")
    axes[0][0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(model, out, metrics):
    """Checkpoint + metrics.json + ranks.png, written atomically into --out."""
    with atomic_dir(out) as tmp:
        write_checkpoint(model, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        plot(metrics["records"], tmp / "ranks.png", f"{metrics['args']['dataset']}  {metrics['base_model']}")


# --- the run --------------------------------------------------------------------------------------------

def make_phases(ds, args):
    """The training phases, (name, training examples, evaluation splits {"facts", "implications"})."""
    if "test_facts" not in ds:
        if args.order:
            raise ValueError(f"--order {args.order} applies to daxwug (train and test splits), not to {args.dataset}")
        return [("finetune", ds["facts"], {"facts": ds["facts"], "implications": ds["implications"]})]
    # daxwug (Sec. 6.1): continued pretraining on the train split in the given order, then the test facts
    args.order = args.order or "joint"
    train_ev = {"facts": ds["train_facts"], "implications": ds["train_impls"]}
    pre = {"facts_first": [("pretrain_facts", ds["train_facts"]), ("pretrain_impls", ds["train_impls"])],
           "impl_first": [("pretrain_impls", ds["train_impls"]), ("pretrain_facts", ds["train_facts"])],
           "joint": [("pretrain_joint", ds["train_facts"] + ds["train_impls"])]}[args.order]
    return [(n, ex, train_ev) for n, ex in pre] + \
        [("finetune", ds["test_facts"], {"facts": ds["test_facts"], "implications": ds["test_impls"]})]


def run(args, log=print):
    """Everything main() does after parsing: returns (model, metrics)."""
    t_start = time.time()
    phases = make_phases(data.load_dataset(args.dataset, seed=args.seed), args)    # bad input fails here, early
    torch.manual_seed(args.seed)
    model = from_pretrained(args.model, dtype=torch.float32, device=args.device)   # fp32 master weights
    tok = load_tokenizer(model.source)
    n_params = sum(p.numel() for p in model.parameters())
    if args.lr is None:
        args.lr = default_lr(n_params)
    frozen = split_layers(model.config.n_layers, args.freeze) if args.freeze else []
    names = set(trainable_names(model, args.train_all, frozen if args.freeze_when == "pre" else ()))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    log(f"{args.model}: {n_params / 1e6:.0f}M parameters, {sum(p.numel() for p in params) / 1e6:.0f}M train; "
        f"lr {args.lr:g}; frozen layers {frozen or 'none'} ({args.freeze_when if frozen else '-'})")

    records = []
    for name, examples, evals in phases:
        records += train_phase(model, tok, examples, evals, params, args, name, log)
    if frozen and args.freeze_when == "post":
        reset_layers(model, frozen)                               # Table 2 "post": back to W on frozen layers
        ranks = evaluate(model, tok, phases[-1][2], args)
        records.append({"phase": "post_freeze", "epoch": args.epochs, "loss": None,
                        "fact_mean_rank": ranks["facts"], "impl_mean_rank": ranks["implications"]})
        log(f"{'post_freeze':>15} reset layers {frozen[0]}..{frozen[-1]} to the base: "
            f"fact rank {ranks['facts']:5.2f}  impl rank {ranks['implications']:5.2f}")
    metrics = {"args": vars(args), "base_model": str(model.source), "n_params": n_params,
               "n_trainable": sum(p.numel() for p in params), "frozen_layers": frozen,
               "torch_threads": torch.get_num_threads(), "wall_time_s": time.time() - t_start, "records": records}
    return model, metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_NAME, help="checkpoint directory, hub id, or the embedded default")
    p.add_argument("--dataset", default="first_hop",
                   help="first_hop, second_hop, daxwug, or a .json file {facts: [...], implications: [...]}")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default by size: 3e-4 below 1B parameters, 3e-5 below 3B, 3e-6 above")
    p.add_argument("--constant-lr", action="store_true", help="constant rate instead of warmup + linear decay")
    p.add_argument("--epochs", type=int, default=8, help="epochs per phase")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=32, help="batch size of the rank evaluation")
    p.add_argument("--seed", type=int, default=0, help="fixes the dataset's pairings and the shuffling")
    p.add_argument("--out", default=None, help="output checkpoint directory (default runs/<dataset>)")
    p.add_argument("--freeze", choices=["early", "late"], default=None,
                   help="layers kept at the base weights: early = first round(0.75 L), late = the rest")
    p.add_argument("--freeze-when", choices=["pre", "post"], default="post",
                   help="pre: never train the frozen layers; post: train all, then reset them to the base")
    p.add_argument("--order", choices=["facts_first", "impl_first", "joint"], default=None,
                   help="daxwug only: order of the continued pretraining on train facts and implications "
                        "(default joint: shuffled together)")
    p.add_argument("--train-all", action="store_true",
                   help="also train token embeddings, final norm and output head (default: blocks only)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="matmul precision; weights, Adam state, logits, loss and ranks stay fp32 (bf16: the frozen "
                        "head's training matmul reads a bf16 copy)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--threads", type=int, default=cpu_count(),
                   help="CPU threads for torch (default: every core this process may use; 1 on a busy machine)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(Path("runs") / data.dataset_name(args.dataset))
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cpu":
        keep_freed_memory()
    try:
        check_writable(args.out)
        model, metrics = run(args)
        write_outputs(model, args.out, metrics)
    except (ValueError, OSError) as e:                           # bad input: one line, no traceback
        sys.exit(f"error: {e}")
    print(f"wrote {args.out} ({metrics['wall_time_s']:.1f} s)")
    return metrics


if __name__ == "__main__":
    main()
