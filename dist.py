"""Several processes, one model: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) under `torchrun`.

    torchrun --nproc_per_node N train.py ...       # N processes (GPUs), the blocks sharded over them
    torchrun --nproc_per_node N scores.py ...      # the prompts shared among them

What is sharded: every transformer block is one `fully_shard` unit (its weights, gradients and Adam moments
split over the N ranks along dim 0; all-gathered for its forward and backward, gradients reduce-scattered);
the root (`fully_shard(model)`) holds nothing but runs FSDP2's root logic: the token embedding, final norm
and output head are frozen by default and stay whole on every rank (ignored_params). Every rank trains on the
same batch: the same numbers as one process (the reduce-scatter averages N equal gradients), the gain is memory.
Launched without torchrun (no WORLD_SIZE in the environment), or with one process, nothing here runs and the
one-process path is as it was. Only rank 0 prints and writes (is_main).
"""
import os

import torch
import torch.distributed as torch_dist

from checkpoint import UserError, load_config, resolve, weights
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
    return device, log if is_main() else (lambda *a, **k: None)


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


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(t):
    """The sum of `t` over the ranks, in place (a no-op for one process)."""
    if world_size() > 1:
        torch_dist.all_reduce(t)
    return t


def close():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
