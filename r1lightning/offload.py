"""The frozen reference's weights in pinned host memory while the policy samples.

A GRPO step holds three things on the GPU while it samples: the policy, the frozen reference (a
second copy of the weights, used only after sampling, for the KL term) and the KV cache. For long
completions the KV is the largest: 16 prompts x G 8 x 4,224 tokens of the OLMoE-1B-7B shape is 66 GiB,
next to 12.9 GiB of bf16 reference weights. Moving the reference to the host for the rollout gives the
KV pool its room: the peak drops by the reference's size where the pool is what sets it, and a pool
capped by free memory (8k+ tokens) holds more sequences before it must preempt.

Cost: the reference is frozen, so its host copy stays valid until something writes its weights
(`callbacks.ReferenceModelRefresh`); each parameter's version counter tells, and only changed ones
are copied back to the host. Bringing it back is one host-to-device copy of the weights per step
(12.9 GiB at the H2D rate, ~0.3 s on an H200 at ~50 GB/s, not yet timed), which is why `auto` only
offloads when the step's KV at full length would not fit the sampler's budget with the reference on
the device (`PagedSampler`: `kv_memory_fraction` of the free memory).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from r1lightning.errors import UserError

log = logging.getLogger(__name__)

def parse_setting(value) -> str | bool:
    """`auto`, true or false (YAML), with a one-line error naming the key."""
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        value = value.lower() if value.lower() == "auto" else value.lower() == "true"
    if not (value == "auto" or isinstance(value, bool)):
        raise UserError(f"model.init_args.offload_reference: expected auto, true or false, got {value!r}")
    return value


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V one token adds over all layers, in the dtype the model samples in."""
    c = model.config.get_text_config()
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    return 2 * c.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def unsupported(module: torch.nn.Module) -> str | None:
    """Why `HostOffload` cannot move this module (None when it can)."""
    params = list(module.parameters())
    if not params:
        return "it has no parameters"
    if any(hasattr(p, "placements") for p in params):  # DTensor: FSDP owns where the shards live
        return "its parameters are sharded (FSDP2 has its own cpu_offload)"
    if params[0].device.type != "cuda":
        return f"it is on {params[0].device.type}, not CUDA"
    return None


class HostOffload:
    """Move a frozen module's parameters to pinned host memory and back, in place (`p.data`).

    Buffers stay on the device (a few small tensors). Nothing else may hold the parameters' device
    tensors: they are freed on `to_host`."""

    def __init__(self, module: torch.nn.Module):
        reason = unsupported(module)
        if reason:
            raise UserError(f"offload_reference: cannot offload the reference: {reason}")
        self.module = module
        self.params = list(module.parameters())  # tied weights appear once
        self.device = self.params[0].device
        self.host: list[Tensor | None] = [None] * len(self.params)
        self.versions: list[int | None] = [None] * len(self.params)  # at the last host copy
        self.on_host = False
        self.copied_bytes = 0  # to the host, over this object's life (tests, logs)

    def to_host(self) -> None:
        if self.on_host:
            return
        for i, p in enumerate(self.params):
            if self.host[i] is None:
                # pinned: the copies run asynchronously at full link speed
                self.host[i] = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self.device.type == "cuda")
            if self.versions[i] != p._version:  # written since the last copy (or never copied)
                self.host[i].copy_(p.data, non_blocking=True)
                self.copied_bytes += p.numel() * p.element_size()
            p.data = self.host[i]  # the device tensor is freed once the copy above has run (stream order)
            self.versions[i] = p._version
        self.on_host = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks to the pool allocation that comes next

    def to_device(self) -> None:
        if not self.on_host:
            return
        for i, p in enumerate(self.params):
            dev = torch.empty(p.shape, dtype=p.dtype, device=self.device)
            dev.copy_(self.host[i], non_blocking=True)
            p.data = dev
            self.versions[i] = p._version
        self.on_host = False


def wants_offload(setting, reference: torch.nn.Module | None, model: torch.nn.Module, rows: int,
                  tokens_per_row: int, kv_budget: float | None = None) -> bool:
    """Whether this step samples with the reference on the host.

    `auto`: on CUDA with an unsharded reference, when the step's KV at full length (rows x
    tokens_per_row x bytes per token) exceeds `kv_budget`, the bytes the sampler's KV could have with
    the reference on the device (so moving it buys room that is needed); without a budget (a sampler
    that does not size its cache from free memory), when that KV is at least the reference's size."""
    if reference is None or setting is False:
        return False
    reason = unsupported(reference)
    if setting is True:
        if reason:
            raise UserError(f"model.init_args.offload_reference: true, but the reference cannot be offloaded: {reason}")
        return True
    if reason:
        return False
    need = rows * tokens_per_row * kv_bytes_per_token(model)
    return need > kv_budget if kv_budget is not None else need >= parameter_bytes(reference)


def free_bytes(device) -> int:
    """What a new allocation could get on `device`: free on the device plus blocks torch holds unused."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
