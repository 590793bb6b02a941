"""AdamW that keeps an fp32 master copy of low-precision weights.

Under `precision: bf16-true` the weights are bf16, whose spacing near a typical weight of 0.02 is
about 1.2e-4: a plain AdamW step of lr 5e-5 rounds away for most weights, and an RL run with
such a learning rate barely moves. This optimizer does the AdamW update on an fp32 copy of every
parameter (kept in its state, so it is checkpointed with it) and writes the rounded result back
into the bf16 weight, which the model and the rollout engine keep using in place. For fp32
parameters it is plain AdamW (the master copy is the parameter itself).

    optimizer:
      class_path: r1lightning.optim.MasterWeightAdamW
      init_args: {lr: 5e-5, betas: [0.9, 0.99], weight_decay: 0.0}
"""

from __future__ import annotations

import math

import torch


class MasterWeightAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):  # fmt: skip
        """
        Args:
            lr, betas, eps, weight_decay: as in `torch.optim.AdamW` (decoupled weight decay).
        """
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"MasterWeightAdamW: invalid lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            if p.dtype != torch.float32:  # fp32 parameters are their own master copy
                state["master"] = p.detach().float().clone()
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self._state(p)
                state["step"] += 1
                step = state["step"]
                master, m, v = state.get("master", p), state["exp_avg"], state["exp_avg_sq"]
                g = p.grad.float()
                if wd:
                    master.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                master.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
                if "master" in state:
                    p.copy_(master)  # rounds to the parameter's dtype
        return loss
