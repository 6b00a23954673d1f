"""The optimizer: Adam, stepping each parameter inside backward() (train.py's only optimizer).

Adam (Kingma & Ba 2015, Algorithm 1; 0.9, 0.999, eps 1e-8, no weight decay) treats every parameter on its own,
so it can update a parameter as soon as that parameter's gradient is complete, during backward(), and free the
gradient at once: the gradients of the whole model are never all held (PyTorch's recipe "fuse the optimizer step
into the backward pass").
"""
import torch

import speedups


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
    for it (CPU, CUDA), speedups.fused_adam runs the same update in one call."""

    betas, eps = (0.9, 0.999), 1e-8

    def __init__(self, params, lr):
        self.lr = lr
        self.fused = speedups.has_fused_adam(params)
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
            speedups.fused_adam(p, m, v, t, self.lr, self.betas, self.eps)
        else:
            self.adam_update(p, p.grad, m, v, t.item())
        p.grad = None

    @torch.no_grad()
    def adam_update(self, p, g, m, v, t):
        """Adam's step t for parameter p with gradient g, in place."""
        b1, b2 = self.betas
        m.lerp_(g, 1 - b1)                                        # m = b1 m + (1 - b1) g
        v.mul_(b2).addcmul_(g, g, value=1 - b2)                   # v = b2 v + (1 - b2) g^2
        denom = (v / (1 - b2 ** t)).sqrt_().add_(self.eps)
        p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** t))

    def remove(self):
        for h in self.hooks:
            h.remove()
