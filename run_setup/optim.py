"""The optimizer: Adam, stepping each parameter inside backward() (train.py's only optimizer), and its memory options.

Adam (Kingma & Ba 2015, Algorithm 1; 0.9, 0.999, eps 1e-8, no weight decay) treats every parameter on its own,
so it can update a parameter as soon as that parameter's gradient is complete, during backward(), and free the
gradient at once: the gradients of the whole model are never all held (PyTorch's recipe "fuse the optimizer step
into the backward pass").

Memory per trained parameter: 4 bytes of fp32 master weight + 8 bytes of fp32 moments (the gradient is transient:
one tensor at a time). Two options shrink the device's share, both keeping fp32 master weights (an update of 1e-6
relative, lr 3e-6, survives; in bf16 weights it would round away):
  moments="bf16"   m and v stored in bf16 (4 bytes less a parameter); the update is computed in fp32 from them,
                   then they are rounded to nearest. Not the fp32 update: each stored moment is off by up to 2^-9
                   relative (tests/test_train.py bounds the update's difference).
  offload=True     m and v live in host memory (pinned on CUDA); each parameter's step copies them to the device,
                   runs the same fused kernel, and copies them back: the fp32 update, bit for bit, for 8 bytes less
                   device memory a parameter and 16 bytes of host<->device traffic a parameter a step.
Under FSDP2 (run_setup/dist.py) the parameters are sharded DTensors; FSDP2 calls their post-accumulate-grad hooks with
the reduced gradient shard, so the same hook steps each rank's shard (the optimizer works on the local tensors).
"""
import torch

from run_setup import speedups


def local(t):
    """The tensor a rank holds: an FSDP2 shard's local part (a view of the parameter's storage), else t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class AdamInBackward:
    """Adam (0.9, 0.999, eps 1e-8, no weight decay) that updates each parameter inside `loss.backward()`, as soon
    as its gradient is complete, and frees that gradient at once (PyTorch's recipe "fuse the optimizer step into
    the backward pass"). Adam treats every parameter on its own and we clip no norm, so the update is exactly that
    of one Adam over all parameters (tested); but the gradients are never all held at once (the default model:
    425 MB less; a 7B model: 28 GB less), and each one is used while it is still in cache.

        opt = AdamInBackward(params, lr)
        opt.start_step(lr_now); loss.backward()  # the step happens here
        opt.remove()                             # at the end of the phase: unhook

    The update of step t (Kingma & Ba 2015, Algorithm 1) is `adam_update` below. Where PyTorch has a fused kernel
    for it (CPU, CUDA) and the moments are fp32, speedups.fused_adam runs the same update in one call.
    `moments`, `offload`: the memory options of the module docstring. `after_step(p)` runs right after each
    parameter's update, while it is in cache (precision.Copies.refresh: its bf16 copy, once per step)."""

    betas, eps = (0.9, 0.999), 1e-8

    def __init__(self, params, lr, moments="fp32", offload=False, after_step=None):
        if moments not in ("fp32", "bf16"):
            raise ValueError(f"moments must be fp32 or bf16, not {moments!r}")
        self.lr, self.offload, self.after_step = lr, offload, after_step
        self.fused = speedups.has_fused_adam(params) and moments == "fp32"
        dtype = torch.bfloat16 if moments == "bf16" else None

        def zeros(p):                                             # one moment of p, where the options put it
            w = local(p).detach()
            if offload:
                return torch.zeros(w.shape, dtype=dtype or w.dtype, device="cpu",
                                   pin_memory=w.device.type == "cuda")   # pinned: copies overlap the backward
            return torch.zeros_like(w, dtype=dtype)
        self.state = {p: (zeros(p), zeros(p)) for p in params}   # Adam's moments m and v
        self.steps = {d: torch.zeros((), dtype=torch.float32, device=d)     # t, one tensor per device
                      for d in {local(p).device for p in params}}
        self.hooks = [p.register_post_accumulate_grad_hook(self._step) for p in params]

    def start_step(self, lr):
        """Call once before each backward(): the learning rate of this step, and t += 1."""
        self.lr = lr
        for t in self.steps.values():
            t.add_(1)                                             # in place: the fused kernel reads this tensor

    @torch.no_grad()
    def _step(self, p):
        w, g = local(p), local(p.grad)                            # this rank's shard under FSDP2
        m_home, v_home = self.state[p]
        t = self.steps[w.device]
        # offload: to the device for the step (a no-op where the device is the host)
        m, v = m_home.to(w.device, non_blocking=True), v_home.to(w.device, non_blocking=True)
        if self.fused:
            speedups.fused_adam(w, g, m, v, t, self.lr, self.betas, self.eps)
        else:
            self.adam_update(w, g, m, v, t.item())
        if m is not m_home:                                       # back to the host, in stream order
            m_home.copy_(m, non_blocking=True)
            v_home.copy_(v, non_blocking=True)
        p.grad = None
        if self.after_step is not None:
            self.after_step(p)

    @torch.no_grad()
    def adam_update(self, p, g, m, v, t):
        """Adam's step t for parameter p with gradient g, in place; in fp32 whatever the moments' dtype."""
        b1, b2 = self.betas
        m32, v32 = m.float(), v.float()                           # m and v themselves when they are fp32
        m32.lerp_(g, 1 - b1)                                      # m = b1 m + (1 - b1) g
        v32.mul_(b2).addcmul_(g, g, value=1 - b2)                 # v = b2 v + (1 - b2) g^2
        denom = (v32 / (1 - b2 ** t)).sqrt_().add_(self.eps)
        p.addcdiv_(m32, denom, value=-self.lr / (1 - b1 ** t))
        if m32 is not m:                                          # bf16 moments: round to nearest when stored
            m.copy_(m32)
            v.copy_(v32)

    def remove(self):
        for h in self.hooks:
            h.remove()


def all_finite(params):
    """Whether every weight is finite: a NaN or inf anywhere makes that tensor's norm NaN or inf (so would a weight
    beyond 1e19, which has diverged too). One fused pass (torch._foreach_norm) instead of isfinite's four passes and
    a bool tensor per weight: 0.06-0.15 s against 5-7 s over the default model's 106M trained weights (2 threads,
    loaded Xeon; 0.18 s idle in ../shared/profile-default-finetune.md). FSDP2 shards: isfinite on each DTensor."""
    if any(hasattr(p, "to_local") for p in params):
        return all(bool(torch.isfinite(p).all()) for p in params)
    return bool(torch.stack(torch._foreach_norm([p.detach() for p in params])).isfinite().all())
