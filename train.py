"""Finetune a pretrained LM on facts and track the mean rank of facts and implications (paper Sec. 5.1, 5.3, 6.1).

    python train.py --dataset first_hop                      # runs/first_hop: checkpoint + metrics.json + ranks.png
    python train.py --dataset second_hop --freeze early --freeze-when pre
    python train.py --dataset daxwug --order facts_first     # continued pretraining, then finetuning on test facts

Adam (0.9, 0.999, eps 1e-8, no weight decay), batch 8, 8 epochs, 10% warmup then linear decay, cross-entropy on
the answer tokens only. By default only the transformer blocks train (attention and MLP projections and their
norms); token embeddings, the final norm and the output head stay frozen, as in the paper's OLMo runs, so a new
fact has to live in the components the scores measure. Master weights are fp32; `--dtype bfloat16` runs the matmuls
in bf16 from bf16 weight copies refreshed once per step (run_setup/precision.py), with norms, softmax, logits and
loss in fp32.
"""
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from run_setup import cli
import data
from run_setup import dist, precision, preflight, speedups
from run_setup.progress import progress
from run_setup.optim import AdamInBackward, all_finite, local as optim_local
from checkpoint_io.checkpoint import (DEFAULT_NAME, UserError, from_pretrained, load_config, load_tokenizer,
                                     multimodal, open_shard, resolve, safetensors_files, text_keys, write_checkpoint)
from checkpoint_io.outputs import atomic_dir, check_output, save_figure, write_json

EARLY_FRACTION = 0.75      # Table 2: "early" = the first 75% of the layers, rounded half up (30 -> 23, 32 -> 24)


# --- what trains ----------------------------------------------------------------------------------

def split_layers(n_layers, which):
    """Indices of the early (first round(0.75 L)) or late (the rest) layers."""
    n_early = math.floor(EARLY_FRACTION * n_layers + 0.5)
    return list(range(n_early)) if which == "early" else list(range(n_early, n_layers))


def default_lr(model_name, n_params):
    """The peak learning rate when --lr is not given: measured per embedded model (default_model.EMBEDDED), else by
    size: the paper's 3e-6 for 7B checkpoints; small models need a larger rate (REFERENCE.md)."""
    from checkpoint_io.default_model import EMBEDDED
    if str(model_name) in EMBEDDED:
        return EMBEDDED[str(model_name)].lr
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
    done, mm = set(), multimodal(model.source)
    with torch.no_grad():
        for f in safetensors_files(Path(model.source)):
            with open_shard(f) as sf:
                for key, name in text_keys(sf, mm):                  # a multimodal base's names are mapped
                    if name.startswith(prefixes):
                        dist.assign(params[name], sf.get_tensor(key))  # into this rank's shard under FSDP2
                        done.add(name)
    missing = {n for n in params if n.startswith(prefixes)} - done
    if missing:
        raise UserError(f"{model.source}: base weights not found for {sorted(missing)[:3]}")


# --- the loss, the schedule, the evaluation ------------------------------------------------------------

def answer_loss(model, ids, mask, labels, head=None):
    """Mean cross-entropy over the answer tokens of a right-padded batch; the output head runs only at the
    positions that predict an answer token. ids, mask, labels (B, T). `head`: a bf16 copy of the frozen head
    (precision.bf16_head) for bf16 training; without it the head's matmul runs in fp32. Logits and loss are fp32.

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


# --- settings: what a finetune is asked to do ---------------------------------------------------------------

@dataclass
class Settings:
    """Everything a finetune needs besides the model and the data; train.py's flags map onto it one to one, and it
    is saved as metrics.json's "args". graft.py and report.py build it directly."""
    model: str = DEFAULT_NAME
    revision: str | None = None        # a hub id's branch, tag or commit (checkpoint.resolve)
    dataset: str = "first_hop"
    lr: float | None = None            # None: default_lr
    schedule: str = "warmup_linear"    # SCHEDULES: the paper's text, or the authors' code ("constant")
    epochs: int = 8
    batch_size: int = 8
    eval_batch_size: int = 32
    seed: int = 0
    freeze: str | None = None          # "early" / "late" (Table 2)
    freeze_when: str = "post"          # "pre": never trained; "post": trained, then reset to the base
    order: str | None = None           # daxwug: facts_first / impl_first / joint (Fig. 4), facts_first_replay
    eval: str = "epochs"               # "epochs": ranks before and after every epoch; "final": after the last only
    train_all: bool = False
    dtype: str | None = None           # "float32" / "bfloat16" matmuls; None: precision.default_dtype
    moments: str = "fp32"              # Adam's m and v: fp32, or bf16 beside the fp32 master weights (optim)
    offload_optimizer: bool = False    # Adam's m and v in host memory, the step on the device (run_setup/optim.py)
    device: str = "cpu"
    threads: int = 1
    out: str | None = None
    overwrite: bool = False

    @staticmethod
    def from_args(ns):
        return Settings(**{f.name: getattr(ns, f.name) for f in fields(Settings)})


def autocast(s: Settings, model):
    """bf16 matmuls of a model sharded by FSDP2, under autocast; otherwise off: precision.matmuls' bf16 copies."""
    return precision.autocast(model, s.dtype)


# The learning-rate schedules, by name: the paper's text says warmup and linear decay (Sec. 5.1); the authors'
# code trains at a constant rate, as their sweeps do (REFERENCE.md)
SCHEDULES = ("warmup_linear", "constant")


def lr_factor(step, total, warmup_frac=0.1, schedule="warmup_linear"):
    """The rate at `step` of `total`, as a fraction of the peak: "warmup_linear", linear warmup over the first 10%
    of the steps, then linear decay towards 0 (paper Sec. 5.1); "constant", the peak throughout (the authors' code)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, round(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / (total - warm + 1))          # peak at the last warmup step, then down


def evaluate(model, tok, evals, s: Settings):
    """Mean ranks of `evals` ({split: examples}), in fp32 whatever s.dtype (precision.fp32)."""
    model.eval()
    with precision.fp32(model):
        return {k: data.mean_rank(model, tok, ex, s.eval_batch_size) for k, ex in evals.items()}


@torch.no_grad()
def dataset_loss(model, batches, s: Settings, head=None):
    with autocast(s, model):
        losses = [answer_loss(model, *b, head=head).item()
                  for b in progress(batches, "loss before training", unit="batch")]
    return sum(losses) / len(losses)


def train_phase(model, tok, examples, evals, params, s: Settings, phase, log, copies=None, snapshots=None):
    """One phase: fresh Adam and schedule over `examples`, evaluating `evals` before and after every epoch (or,
    with s.eval == "final", after the last epoch only: the grid reports nothing else, and the 40-prompt evaluation
    costs a few seconds). Returns the records {"phase", "epoch", "loss", "fact_mean_rank", "impl_mean_rank"}. `copies`:
    precision.matmuls' bf16 weight copies, refreshed after each update. `snapshots`: {k: fn(records)}, called after
    epoch k (evaluated then, whatever s.eval) with a k-epoch run's records: at a constant rate a longer run's first k
    epochs are the k-epoch run (the same batches, rate, Adam state), so one 16-epoch run also gives the 8-epoch model
    (the graft sweep's cells, graft.sweep_stages)."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in data.encode_examples(tok, examples))   # (N, T) each
    N, B = len(examples), s.batch_size
    steps_per_epoch = math.ceil(N / B)
    total = s.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(s.seed)                  # reshuffled every epoch, reproducibly
    head = copies.head if copies else precision.bf16_head(model, s.dtype)

    def batch(rows):
        T = int(mask[rows].sum(1).max())                          # trim padding to the batch's longest
        return ids[rows, :T], mask[rows, :T], labels[rows, :T]

    def record(epoch, loss, t0):
        ranks = evaluate(model, tok, evals, s)
        r = {"phase": phase, "epoch": epoch, "loss": loss,
             "fact_mean_rank": ranks["facts"], "impl_mean_rank": ranks["implications"]}
        log(f"{phase:>15} epoch {epoch:2d}/{s.epochs}  loss {loss:7.4f}  fact rank {r['fact_mean_rank']:5.2f}"
            f"  impl rank {r['impl_mean_rank']:5.2f}  ({time.time() - t0:5.1f} s)")
        return r

    if (snapshots := snapshots or {}) and s.schedule != "constant":
        raise ValueError(f"snapshots need a constant rate: under {s.schedule!r} a shorter run's rates differ")
    t0 = time.time()
    # epoch 0: the loss of the untrained model on the whole training set
    records = [record(0, dataset_loss(model, [batch(torch.arange(i, min(i + B, N), device=device))
                                              for i in range(0, N, B)], s, head), t0)] if s.eval == "epochs" else []
    opt, step = AdamInBackward(params, s.lr, s.moments, s.offload_optimizer,       # a fresh Adam every phase,
                               copies and copies.refresh), 0                       # refreshing the bf16 copies
    try:
        for epoch in range(1, s.epochs + 1):
            model.train()
            perm = torch.randperm(N, generator=gen).to(device)
            losses = []
            for i in progress(range(0, N, B), f"{phase} epoch {epoch}/{s.epochs}", unit="step"):
                opt.start_step(s.lr * lr_factor(step, total, schedule=s.schedule))
                with autocast(s, model):
                    loss = answer_loss(model, *batch(perm[i:i + B]), head=head)
                loss.backward()                                   # Adam updates every parameter in here
                step += 1
                losses.append(loss.item())                        # the one host sync a step: the log needs it
                if not math.isfinite(losses[-1]):
                    raise UserError(f"training diverged: the loss is {losses[-1]} at {phase} epoch {epoch} "
                                    f"(lr {s.lr:g}); nothing was written: try a smaller --lr")
            if not all_finite(params):                            # once an epoch: one fused pass over them
                raise UserError(f"training diverged: the weights are not finite after {phase} epoch {epoch} "
                                f"(lr {s.lr:g}); nothing was written: try a smaller --lr")
            kept = s.eval == "epochs" or epoch == s.epochs
            if kept or epoch in snapshots:                        # loss: the mean over the epoch's batches
                r = record(epoch, sum(losses) / len(losses), t0)
                records += [r] if kept else []
                if epoch in snapshots:                            # what an `epoch`-epoch run returns
                    snapshots[epoch](list(records) if s.eval == "epochs" else [r])
    finally:
        opt.remove()
    return records


# --- the finetune ------------------------------------------------------------------------------------------

def finetune(model, tok, phases, s: Settings, log=print, snapshots=None):
    """Train `model` in place through `phases` (data.phases' format) with the settings `s`: the blocks (or
    everything, train_all) minus the layers frozen "pre"; layers frozen "post" are reset to the base
    (model.source) at the end. Returns (records, facts for metrics.json). `snapshots`: train_phase's, as fn(records,
    facts), for one phase without frozen layers."""
    n_params = sum(p.numel() for p in model.parameters())
    s.dtype = s.dtype or precision.default_dtype(s.device)       # fp32 unless bf16's checks held
    if warning := precision.slow_bf16(s.device, s.dtype):
        log(f"warning: {warning}")
    frozen = split_layers(model.config.n_layers, s.freeze) if s.freeze else []
    names = set(trainable_names(model, s.train_all, frozen if s.freeze_when == "pre" else ()))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    log(f"{s.model}: {n_params / 1e6:.0f}M parameters, {sum(p.numel() for p in params) / 1e6:.0f}M train; "
        f"lr {s.lr:g}; frozen layers {frozen or 'none'} ({s.freeze_when if frozen else '-'})")
    if snapshots and (len(phases) != 1 or frozen):
        raise ValueError("snapshots are for a one-phase finetune without frozen layers")
    facts = {"n_params": n_params, "n_trainable": sum(p.numel() for p in params),
             "n_trainable_this_rank": sum(optim_local(p).numel() for p in params),    # under FSDP2: this rank's
             "frozen_layers": frozen, "precision": precision.describe(s.device, s.dtype)}
    snapshots, records = {k: (lambda records, fn=fn: fn(records, facts)) for k, fn in (snapshots or {}).items()}, []
    with precision.matmuls(model, s.dtype) as copies:             # bf16: weight copies, cast once for all phases
        for name, examples, evals in phases:
            records += train_phase(model, tok, examples, evals, params, s, name, log, copies, snapshots)
    if frozen and s.freeze_when == "post":
        reset_layers(model, frozen)                               # Table 2 "post": back to W on frozen layers
        ranks = evaluate(model, tok, phases[-1][2], s)
        records.append({"phase": "post_freeze", "epoch": s.epochs, "loss": None,
                        "fact_mean_rank": ranks["facts"], "impl_mean_rank": ranks["implications"]})
        log(f"{'post_freeze':>15} reset layers {frozen[0]}..{frozen[-1]} to the base: "
            f"fact rank {ranks['facts']:5.2f}  impl rank {ranks['implications']:5.2f}")
    for p in params:
        p.requires_grad_(False)
    return records, facts


def run(s: Settings, log=print, model=None):
    """Load (unless `model` is given: a fresh model at the base weights), finetune, and return (model, metrics).
    Under torchrun with N > 1 processes (run_setup/dist.py) the model is loaded sharded over them, each rank trains on
    the same batches, and only rank 0 logs; `model` must then be None."""
    t_start = time.time()
    phases = data.phases(data.load_dataset(s.dataset, seed=s.seed), s.order, s.dataset)   # bad input: here
    path = resolve(s.model, s.revision)
    tok = load_tokenizer(path)
    cfg = load_config(path)
    data.check_context(tok, [e for _, ex, ev in phases for e in ex + sum(ev.values(), [])], cfg.max_positions)
    if dist.launched() > 1:                                             # torchrun: checks, then the process group
        s.device, log = dist.setup_training(cfg, s.device, s.train_all, model, log)
    chance = {name: preflight.answers(tok, ev, log, f"{name}: ") for name, _, ev in phases}   # before the model loads
    torch.manual_seed(s.seed)
    if model is None:
        model = dist.load_sharded(path, s.device) if dist.world_size() > 1 else \
            from_pretrained(path, dtype=torch.float32, device=s.device)   # fp32 master weights
    if s.lr is None:
        s.lr = default_lr(s.model, sum(p.numel() for p in model.parameters()))
    records, facts = finetune(model, tok, phases, s, log)
    metrics = {"args": asdict(s), "base_model": str(model.source), **facts, "chance_mean_rank": chance,
               "torch_threads": torch.get_num_threads(), "world_size": dist.world_size(),
               "wall_time_s": time.time() - t_start, "records": records}
    return model, metrics


# --- output -----------------------------------------------------------------------------------------------

def ranks_figure(records, title, chance):
    """Fact and implication mean rank against epoch, one panel per phase (paper Fig. 2 / Fig. 4), with each split's
    chance level (`chance`: {phase: {"facts": c, "implications": c}}), the legend below the panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    phases = list(dict.fromkeys(r["phase"] for r in records))
    fig, axes = plt.subplots(1, len(phases), figsize=(1.5 + 4 * len(phases), 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, ph in zip(axes[0], phases):
        rs = [r for r in records if r["phase"] == ph]
        levels = chance.get(ph, {})
        for key, split, marker in (("fact_mean_rank", "facts", "o"), ("impl_mean_rank", "implications", "s")):
            line, = ax.plot([r["epoch"] for r in rs], [r[key] for r in rs], marker + "-", label=split)
            if split in levels and len(set(levels.values())) > 1:   # a user dataset: each split its own chance
                ax.axhline(levels[split], ls=":", color=line.get_color(), label=f"{split}: chance ({levels[split]:g})")
        if len(set(levels.values())) == 1:
            c = next(iter(levels.values()))
            ax.axhline(c, ls=":", color="grey", label=f"chance ({c:g})")
        ax.set(title=ph, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))       # whole epochs
    axes[0][0].set(ylabel="mean rank (lower is better)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def save(model, out, metrics, overwrite=False, inputs=(), log=print):
    """Checkpoint + metrics.json (strict JSON) + ranks.png, as one directory that replaces `out` whole (train.py's,
    graft.py's, report.py's). Under torchrun a collective: the full state dict gathered by every rank, written by
    rank 0, and every rank learns whether that worked (dist.on_main): a failed write ends them all, none waits."""
    state = dist.full_state_dict(model)                           # torchrun: on rank 0's CPU, {} elsewhere

    def write():
        with atomic_dir(out, "checkpoint", overwrite, inputs, log) as tmp:
            write_checkpoint(model, tmp, state)
            write_json(tmp / "metrics.json", metrics)
            title = f"{Path(str(metrics['args']['dataset'])).name} on {Path(str(metrics['args']['model'])).name}"
            save_figure(ranks_figure(metrics["records"], title, metrics.get("chance_mean_rank", {})), tmp / "ranks.png")
    dist.on_main(write)
    return Path(out)


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", default=DEFAULT_NAME, help="checkpoint directory, hub id, or the embedded default")
    cli.revision_flag(p)
    p.add_argument("--dataset", default="first_hop",
                   help="first_hop, second_hop, daxwug (80 + 20 names, the paper), daxwug_authors (84 + 20, the "
                        "authors' code), or a .json file {facts: [...], implications: [...]}")
    p.add_argument("--lr", type=cli.positive_float, default=None,
                   help="peak learning rate; default: the embedded model's measured rate (smollm2-135m 3e-4, "
                        "gemma3-270m 1e-4), else by size: 3e-4 below 1B parameters, 3e-5 below 3B, 3e-6 above")
    p.add_argument("--schedule", choices=SCHEDULES, default="warmup_linear",
                   help="learning-rate schedule: warmup_linear (10%% warmup, then linear decay: the paper's text) or "
                        "constant (the authors' code and sweeps)")
    p.add_argument("--epochs", type=cli.positive_int, default=8, help="epochs per phase")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="training batch size")
    p.add_argument("--eval-batch-size", type=cli.positive_int, default=32, help="batch size of the rank evaluation")
    p.add_argument("--seed", type=int, default=0, help="fixes the dataset's pairings and the shuffling")
    p.add_argument("--out", default=None, help="output checkpoint directory (default runs/<dataset>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not a checkpoint of ours (by default that is an error)")
    p.add_argument("--freeze", choices=["early", "late"], default=None,
                   help="layers kept at the base weights: early = first round(0.75 L), late = the rest")
    p.add_argument("--freeze-when", choices=["pre", "post"], default="post",
                   help="pre: never train the frozen layers; post: train all, then reset them to the base")
    p.add_argument("--order", choices=["facts_first", "impl_first", "joint", "facts_first_replay"], default=None,
                   help="daxwug only: order of the continued pretraining on train facts and implications "
                        "(default joint: shuffled together; facts_first_replay: facts, then implications with the "
                        "facts replayed)")
    p.add_argument("--eval", choices=["epochs", "final"], default="epochs",
                   help="when the ranks are evaluated: before and after every epoch, or after the last one only")
    p.add_argument("--train-all", action="store_true",
                   help="also train token embeddings, final norm and output head (default: blocks only)")
    p.add_argument("--dtype", choices=precision.DTYPES, default=None,
                   help="the training steps' matmul precision (default float32: bf16's checks failed, "
                        "run_setup/precision.py); weights, Adam state, norms, softmax, logits, loss and the "
                        "ranks' evaluation stay fp32; bf16 is fast only on a CPU with AMX or AVX512-BF16")
    p.add_argument("--moments", choices=["fp32", "bf16"], default="fp32",
                   help="Adam's moments: fp32, or bf16 beside fp32 master weights (4 bytes less a trained parameter; "
                        "the update rounds m and v to bf16)")
    p.add_argument("--offload-optimizer", action="store_true",
                   help="keep Adam's moments in host memory and copy them to the device for each parameter's step "
                        "(8 bytes less device memory a trained parameter; the fp32 update, bit for bit; slower)")
    p.add_argument("--device", type=cli.device_name, default=cli.default_device(), help="torch device")
    cli.threads_flag(p)
    s = Settings.from_args(p.parse_args(argv))
    s.out = s.out or str(Path("runs") / data.dataset_name(s.dataset))
    torch.set_num_threads(s.threads)
    speedups.for_device(s.device)

    def work():
        inputs = preflight.inputs([resolve(s.model, s.revision)], s.dataset)   # --out must not replace these
        s.device = dist.init(s.device)                            # torchrun: the process group, so that ...
        dist.on_main(check_output, s.out, "checkpoint", s.overwrite, inputs)   # ... rank 0 alone checks (and cleans
        # a killed run's leftovers), before the model loads, not after training
        model, metrics = run(s)
        save(model, s.out, metrics, s.overwrite, inputs)
        if dist.is_main():
            print(f"wrote {s.out} ({metrics['wall_time_s']:.1f} s)")
        return metrics
    try:
        return cli.run(work)
    finally:
        dist.close()


if __name__ == "__main__":
    main()
