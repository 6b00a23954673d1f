"""Several processes, one model: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) under `torchrun`.

    torchrun --nproc_per_node N train.py ...       # N processes (GPUs), the blocks sharded over them
    torchrun --nproc_per_node N scores.py ...      # W and W' sharded, the prompts shared among the ranks
    torchrun --nproc_per_node N report.py ...      # every stage's models sharded (graft.py --experiment too)

What is sharded: every transformer block is one `fully_shard` unit (its weights, gradients and Adam moments
split over the N ranks along dim 0; all-gathered for its forward and backward, gradients reduce-scattered);
the root (`fully_shard(model)`) holds nothing but runs FSDP2's root logic: the token embedding, final norm
and output head are frozen by default and stay whole on every rank (ignored_params). Every rank trains on the
same batch: the same numbers as one process (the reduce-scatter averages N equal gradients), the gain is memory.
Launched without torchrun (no WORLD_SIZE in the environment), or with one process, nothing here runs and the
one-process path is as it was. Only rank 0 prints (main_log) and writes (on_main); after a write, and after each
of report.py's stages, the ranks agree on whether it worked (agree), so that a failure on one rank ends, or is
recorded by, all of them together instead of leaving the others waiting in a collective it never reaches.
"""
import copy
import os
import sys

import torch
import torch.distributed as torch_dist

from checkpoint_io.checkpoint import UserError, from_pretrained, load_config, resolve, weights
from model import Transformer


def world_size():
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank():
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def is_main():
    return rank() == 0


def launched():
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device):
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) when more than one process was launched. Returns
    this rank's device: cuda:LOCAL_RANK on CUDA. Wrong launches end with a one-line UserError."""
    n = launched()
    if n == 1 or torch_dist.is_initialized():
        return device
    dev = torch.device(device)
    backend = {"cpu": "gloo", "cuda": "nccl"}.get(dev.type)
    if backend is None:
        raise UserError(f"torchrun with --device {device}: FSDP2 runs here on cpu (gloo) or cuda (nccl) only")
    if not torch_dist.is_available() or not torch_dist.is_backend_available(backend):
        raise UserError(f"torchrun with {n} processes needs the {backend} backend, which this torch build lacks: "
                        "install a torch with distributed support, or run one process")
    if dev.type == "cuda":
        local_rank, local_n = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", n))
        if torch.cuda.device_count() < local_n:
            raise UserError(f"torchrun started {local_n} processes on this node but it has "
                            f"{torch.cuda.device_count()} GPUs: pass --nproc_per_node {torch.cuda.device_count()}")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    torch_dist.init_process_group(backend)
    return str(dev)


def check_layers(n_layers, what="train.py"):
    """FSDP2 shards by block: more processes than blocks would leave a rank without a layer to hold."""
    n = launched()
    if n > n_layers:
        raise UserError(f"{what}: {n} processes for a model of {n_layers} layers: launch at most {n_layers} "
                        f"(torchrun --nproc_per_node {n_layers})")


def setup_training(cfg, device, train_all, model, log):
    """train.run under torchrun: refuse what FSDP2 sharding cannot do, join the process group, and log on rank 0
    only. Returns (this rank's device, log)."""
    check_layers(cfg.n_layers)
    if train_all:
        raise UserError("--train-all under torchrun: the embeddings and head are not sharded; train them in one "
                        "process, or train the blocks only (the default)")
    if model is not None:
        raise UserError("train.run under torchrun loads the model itself (sharded): pass model=None")
    device = init(device)
    return device, main_log(log)


def main_log(log):
    """`log` on rank 0, a no-op on the others: under torchrun one rank speaks for all."""
    return log if is_main() else (lambda *a, **k: None)


def fresh_copy(base):
    """train.run's `model` for a training stage of report.py or paper_report/sweep.py: in one process a copy of the
    base model that `base()` loaded once; under torchrun None, and train.run loads the base sharded, so no rank
    holds it whole."""
    return copy.deepcopy(base()) if world_size() == 1 else None


def shard(model):
    """fully_shard on every block, then on the root with the non-block weights left whole (ignored_params).
    `hidden` is registered as a forward method so that FSDP2's root hooks run for train.py's and data.py's
    model.hidden(...) calls, which bypass model.forward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in model.layers:
        fully_shard(block)
    rest = {p for n, p in model.named_parameters() if not n.startswith("model.layers.")}
    fully_shard(model, ignored_params=rest)
    register_fsdp_forward_method(model, "hidden")
    return model


def load_sharded(name_or_path, device, dtype=torch.float32):
    """checkpoint.from_pretrained's model, sharded: built on the meta device, sharded, given storage for this
    rank's shards only, then filled tensor by tensor from the safetensors (each rank reads a whole tensor at a
    time and keeps its shard), so no rank ever holds the whole model."""
    path = resolve(name_or_path)
    cfg = load_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    shard(model)
    model.to_empty(device=device)
    params, done = dict(model.named_parameters()), set()
    with torch.no_grad():
        for key, t in weights(path, cfg, expected):
            assign(params[key], t.to(device=device, dtype=dtype))
            done.add(key)
    missing = sorted(set(expected) - done)
    if missing:
        raise UserError(f"{path}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.source = path
    return model.eval()


def layer_by_layer(*models):
    """`for l in layer_by_layer(a, b)`: the layer indices, with layer l of every model whole during iteration l
    (FSDP2's unshard: all-gathered, freed before the next), for code that reads a block's weights or calls its
    parts rather than its forward (scores.py's per-layer passes). Models that are not sharded: just range(L)."""
    for l in range(len(models[0].layers)):
        blocks = [m.layers[l] for m in models if hasattr(m.layers[l], "unshard")]
        for blk in blocks:
            blk.unshard()
        try:
            yield l
        finally:
            for blk in blocks:
                blk.reshard()


def load(name_or_path, device):
    """A frozen fp32 model to evaluate or score: under torchrun sharded over the ranks (load_sharded), so that no
    rank holds a whole model and every rank must run the same forwards (they do: each evaluates every prompt, and
    scores.py's passes run the same layers on every rank's share of the prompts); one process:
    checkpoint.from_pretrained."""
    return (load_sharded(name_or_path, device) if world_size() > 1 else from_pretrained(name_or_path, device=device))


@torch.no_grad()
def assign(param, full):
    """Copy the whole tensor `full` into `param`: into this rank's shard when param is an FSDP2 DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        # src_data_rank=None: every rank has `full`, each keeps its own chunk without communication
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param = param.to_local()
    param.copy_(full)


def full_state_dict(model):
    """The whole state dict, on the CPU of rank 0 (other ranks: {}), gathered shard by shard; a collective that
    every rank calls. One process: the model's own state dict."""
    if world_size() == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- agreeing on success -----------------------------------------------------------------------------

def agree(error=None):
    """Every rank's outcome of one step, told to every rank: None when no rank failed, else the message of the first
    that did (`error`: this rank's exception, or None). A collective that every rank calls, failed or not, so that
    no rank goes on alone to the next collective and waits there forever. One process: error's own message."""
    mine = None if error is None else str(error) or type(error).__name__
    if world_size() == 1:
        return mine
    outcomes = [None] * world_size()
    torch_dist.all_gather_object(outcomes, mine)                  # nccl: through this rank's GPU (init set it)
    failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
    if not failed:
        return None
    r, m = failed[0]
    return m if r == 0 else f"rank {r}: {m}"


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only (a write, or a check that cleans up beside an output), then agree: every
    rank waits for it and learns whether it worked. A failure raises on every rank (rank 0's own exception there,
    a UserError with its message elsewhere), so they all end, or record the failure, together. Returns fn's result
    on rank 0 and None elsewhere; one process: fn's result."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:                                    # told to the others first, then raised here
            error = e
    failed = agree(error)
    if error is not None:
        raise error
    if failed is not None:
        raise UserError(f"rank 0 failed: {failed}")
    return result


def all_reduce_sum(t):
    """The sum of `t` over the ranks, in place (a no-op for one process)."""
    if world_size() > 1:
        torch_dist.all_reduce(t)
    return t


def close():
    """Leave the process group (called in a `finally`). After a normal run a barrier first, so that no rank tears
    gloo's threads down while another still talks to it (an intermittent SIGABRT at exit, "terminate called without
    an active exception", in the 2-rank report test); while an exception ends this rank, no barrier, which the
    others might never reach."""
    if torch_dist.is_initialized():
        try:
            if sys.exc_info()[0] is None:
                torch_dist.barrier()
        finally:
            torch_dist.destroy_process_group()
