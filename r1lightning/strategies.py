"""FSDP2 for any transformers model of a LightningModule (the policy and the GRPO reference).

`FSDP2Strategy`: Lightning's `ModelParallelStrategy` with PyTorch FSDP2 (`fully_shard`) applied to
every Hugging Face model of the LightningModule: one unit per decoder layer, found from the model's
`_no_split_modules` once it is built, plus one for the rest. FSDP2 rather than FSDP1 because its
units are hooks on the modules themselves: `model.generate` and any number of forward/backward
passes inside one `training_step` just work, which FSDP1 wrapping the whole LightningModule does
not allow.

Fault tolerance lives elsewhere: checkpoint files and the resumable loader in
`r1lightning.checkpointing`, per-step seeds in `r1lightning.seeding`, and the callbacks every run
gets (`ExactResume`, `NonFiniteGuard`, `InterruptCheckpoint`) in `r1lightning.callbacks`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

log = logging.getLogger(__name__)


def hf_models(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost transformers models inside `module` (policy, reference), in attribute order."""
    from transformers import PreTrainedModel

    found, skip = [], set()
    for name, sub in module.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(sub, PreTrainedModel):
            found.append(sub)
            skip.add(name + ".")
    return found


def decoder_layer_names(model: torch.nn.Module, override: list[str] | None = None) -> set[str]:
    """Class names of the blocks FSDP shards one by one: the model's `_no_split_modules`, the
    classes transformers itself never splits across devices (its decoder layers)."""
    names = set(override or getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    names &= present
    if not names:
        raise ValueError(
            f"FSDP2Strategy: {type(model).__name__} names no decoder layer class in `_no_split_modules`; "
            "set `layer_classes: [<DecoderLayerClassName>]` on the strategy"
        )
    return names


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def gathered(model: torch.nn.Module, enabled: bool = True):
    """Rollouts call the model once per new token: all-gather its FSDP2 shards once for the whole
    rollout instead of layer by layer on every call. A no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    if not units:
        yield
        return
    reshard = getattr(model, "_r1l_reshard_after_forward", True)
    with torch.no_grad():
        units[0].set_reshard_after_forward(False, recurse=True)
        for unit in units:
            unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        units[0].set_reshard_after_forward(reshard, recurse=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of an FSDP2-sharded model on rank 0 (on the CPU; empty on other ranks);
    None when the model is not sharded. A collective: every rank must call it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all processes, for any transformers model.

    Compose: `r1lightning fit -c <recipe>.yaml -c configs/strategy/fsdp.yaml`.
    """

    def __init__(
        self,
        layer_classes: list[str] | None = None,
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        gather_for_rollout: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ):
        """
        Args:
            layer_classes: class names of the blocks to shard one by one; default: the model's
                `_no_split_modules` (its decoder layers).
            activation_checkpointing: recompute each decoder layer in backward (transformers'
                gradient checkpointing, non-reentrant) on the trainable models.
            cpu_offload: keep parameter shards, gradients and optimizer state in CPU memory
                (the optimizer step then runs on the CPU).
            reshard_after_forward: free gathered layers after forward (ZeRO-3); False keeps them
                until backward (ZeRO-2 style, more memory, less communication).
            gather_for_rollout: gather the whole policy once per rollout rather than per layer per
                generated token (memory of one full copy while generating).
            save_distributed_checkpoint: each rank writes its shard (a checkpoint directory;
                `r1lightning export` consolidates it); False gathers one file on rank 0.
        Mixed precision follows `trainer.precision`: `bf16-mixed` computes in bf16 and reduces
        gradients in fp32 over fp32 master weights; `bf16-true` keeps the weights in bf16.
        """
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size="auto", save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.layer_classes = layer_classes
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.gather_for_rollout = gather_for_rollout

    def setup_environment(self) -> None:
        # One data-parallel dimension over every process (ModelParallelStrategy's default puts the
        # devices of a node on a tensor-parallel dimension).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        module = self.lightning_module
        models = hf_models(module)
        if not models:
            raise ValueError("FSDP2Strategy: the LightningModule holds no transformers model to shard")
        if self.world_size > 1 and getattr(module, "hparams", {}).get("dynamic_sampling_rounds", 0):
            # Re-sampling runs only on ranks with flat groups; sharded forwards are collectives.
            raise ValueError("FSDP2Strategy: dynamic_sampling_rounds > 0 needs every rank to sample alike; set it to 0")
        if not any(is_sharded(m) for m in models):
            self.model = self.precision_plugin.convert_module(self.model)  # bf16-true: shard bf16 weights
            for model in models:
                self._shard(model)
        super().setup(trainer)

    def _shard(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        if self.activation_checkpointing and any(p.requires_grad for p in model.parameters()):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        precision = getattr(self.precision_plugin, "precision", "32-true")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16-mixed" else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda") if self.cpu_offload else OffloadPolicy()
        kwargs = dict(mesh=self.device_mesh["data_parallel"], mp_policy=mp, offload_policy=offload,
                      reshard_after_forward=self.reshard_after_forward)
        names = decoder_layer_names(model, self.layer_classes)
        layers = [m for m in model.modules() if type(m).__name__ in names]
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)  # embeddings, final norm, head (tied weights stay in one unit)
        model._r1l_reshard_after_forward = self.reshard_after_forward
        log.info("FSDP2Strategy: sharded %s in %d layer units over %d processes", type(model).__name__, len(layers), self.world_size)

    def model_to_device(self) -> None:
        if not self.cpu_offload:
            return super().model_to_device()
        # FSDP keeps offloaded shards on the CPU; move only what it does not manage.
        from torch.distributed.tensor import DTensor

        device = self.root_device

        def move(t):
            return t if isinstance(t, DTensor) else t.to(device)

        self.model._apply(move)
        self.model._device = device  # what `LightningModule.device` reports

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # A directory cannot be renamed over another: write beside it, then swap, so a crash never
        # leaves a half-written checkpoint under the final name.
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            if path.exists():
                os.replace(path, old) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
            if old.exists():
                shutil.rmtree(old)
        self.barrier()

