"""Strategies and fault tolerance.

- `FSDP2Strategy`: Lightning's `ModelParallelStrategy` with PyTorch FSDP2 (`fully_shard`) applied to
  every Hugging Face model of the LightningModule (the policy and the GRPO reference): one unit per
  decoder layer, found from the model's `_no_split_modules` once it is built, plus one for the rest.
  FSDP2 rather than FSDP1 because its units are hooks on the modules themselves: `model.generate`
  and any number of forward/backward passes inside one `training_step` just work, which FSDP1
  wrapping the whole LightningModule does not allow.
- `ExactResume`: what `--ckpt_path last` needs beyond Lightning's own state: the position inside
  the epoch, per-step RNG seeds, and checkpoint files written atomically.
- `NonFiniteGuard`: skips optimizer steps whose gradients are not finite, counts them, stops after
  too many in a row.
- `InterruptCheckpoint`: on SIGINT (Ctrl-C), SIGTERM or SIGUSR1 (SLURM's pre-emption warning) the
  step in progress finishes, `last.ckpt` is written and the run exits; `--ckpt_path last` continues
  from that step. A second signal stops at once.

`PolicyModule.configure_callbacks` adds these callbacks to every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shutil
import signal
import threading
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

log = logging.getLogger(__name__)


# -- FSDP2 ---------------------------------------------------------------------------------------
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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor shards: look at this rank's part


def grads_finite(parameters) -> bool:
    """Whether this rank's gradients are all finite (sharded ones: this rank's shard)."""
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return True
    # max |g| is NaN/inf exactly when some entry is; one reduction per tensor, one sync in all.
    return bool(torch.stack([torch.linalg.vector_norm(g, float("inf")).float() for g in grads]).isfinite().all())


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


# -- exact resume --------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file in the target directory, fsync, rename. (Lightning's own
    save goes through a temporary file in the system temp dir, which is a copy, not a rename, when
    that is another file system.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def _samplers(loader) -> tuple:
    """Where a DataLoader's sampler can be: its own, or inside its batch sampler."""
    return getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)


def _set_epoch(loader, epoch: int) -> None:
    for obj in _samplers(loader):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _epoch_of(loader) -> int | None:
    for obj in _samplers(loader):
        if hasattr(obj, "epoch"):
            return int(obj.epoch)
    return None


class ResumableLoader:
    """A training DataLoader that Lightning checkpoints (it has `state_dict`/`load_state_dict`).

    Saved: the batches trained in this pass (`consumed`, set by `ExactResume`), the loader's
    generator state when the pass began and now, and the sampler's epoch. Restored, the pass is
    re-opened from the same generator state and the trained batches are skipped (their indices
    are drawn and collated again; the data itself is already tokenised).
    """

    def __init__(self, loader):
        self.loader = loader
        self.consumed = 0
        self._pending: dict | None = None
        self._start_state: torch.Tensor | None = None

    def __getattr__(self, name):  # sampler, batch_sampler, dataset, batch_size, ... for Lightning
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def _generator(self) -> torch.Generator | None:
        return getattr(self.loader, "generator", None)

    def __iter__(self):
        gen, skip = self._generator(), 0
        if self._pending is not None:
            state, self._pending = self._pending, None
            if state.get("epoch") is not None:
                _set_epoch(self.loader, state["epoch"])
            finished = state["consumed"] >= len(self)
            saved = state["end"] if finished else state["start"]
            if gen is not None and saved is not None:
                gen.set_state(saved)
            skip = 0 if finished else state["consumed"]
        elif gen is not None and self._start_state is not None and self.consumed == 0:
            gen.set_state(self._start_state)  # the last pass trained nothing: it leaves no trace
        self._start_state = gen.get_state() if gen is not None else None
        it = iter(self.loader)
        for _ in range(skip):
            next(it)
        self.consumed = skip
        yield from it

    def state_dict(self) -> dict:
        gen = self._generator()
        return {"consumed": self.consumed, "start": self._start_state, "end": gen.get_state() if gen is not None else None,
                "epoch": _epoch_of(self.loader)}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state)
        self.consumed = 0


def step_seed(base: int, *parts: int) -> int:
    key = "/".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


class ExactResume(L.Callback):
    """Makes `--ckpt_path last` continue exactly where the run stopped.

    - Data position: the training loader becomes a `ResumableLoader`, whose state Lightning saves
      with its loops (Lightning restarts a plain DataLoader at the start of its epoch).
    - RNG: every training batch starts from seeds derived from (seed_everything's seed, epoch,
      batch index, rank). Rollout sampling and dropout then depend only on what the checkpoint
      holds, whatever ran between the save and the resume (sanity check, validation); and ranks
      draw different samples.
    - Checkpoint files are written atomically (`AtomicCheckpointIO`).
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.loader: ResumableLoader | None = None
        self._original = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if type(getattr(strategy, "_checkpoint_io", None)) in (TorchCheckpointIO, type(None)) and hasattr(strategy, "checkpoint_io"):
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self._original is None:
            # The loader must be wrapped after Lightning adds its distributed sampler and before the
            # fit loop opens it; the strategy's `process_dataloader` is the one hook in between.
            self._original = original = strategy.process_dataloader

            def process_dataloader(loader):
                loader = original(loader)
                if trainer.training and not isinstance(loader, ResumableLoader) and hasattr(loader, "__len__"):
                    loader = self.loader = ResumableLoader(loader)
                return loader

            strategy.process_dataloader = process_dataloader

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._original is not None:
            trainer.strategy.process_dataloader = self._original
            self._original = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed_all(step_seed(base, trainer.current_epoch, batch_idx, trainer.global_rank))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.loader is not None:
            self.loader.consumed = batch_idx + 1


# -- non-finite steps ----------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard(L.Callback):
    """Before every optimizer step (automatic or manual optimisation alike: Lightning calls
    `on_before_optimizer_step` inside `optimizer.step()`), check the gradients. If any rank has a
    non-finite one, drop all gradients so the optimizer leaves the parameters and its state alone
    (torch optimizers skip parameters without a gradient), count the step and log the total as
    `train/nonfinite_skipped`. Stop after `max_in_a_row` consecutive skips.
    """

    def __init__(self, max_in_a_row: int | None = 3):
        self.max_in_a_row = max_in_a_row
        self.skipped = 0
        self.in_a_row = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = trainer.strategy.reduce_boolean_decision(grads_finite(params), all=True)
        if finite:
            self.in_a_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.in_a_row += 1
            if trainer.is_global_zero:
                log.warning("non-finite gradient at step %d: step skipped (%d in a row, %d in all)",
                            trainer.global_step, self.in_a_row, self.skipped)
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"stopping at step {trainer.global_step}: {self.in_a_row} optimizer steps in a row had a non-finite "
                f"loss or gradient (max_nonfinite_in_a_row={self.max_in_a_row}). Lower the learning rate, check the "
                "data of these steps, or resume from the last checkpoint."
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = state["skipped"], state["in_a_row"]


# -- interrupts ----------------------------------------------------------------------------------
def _last_path(cb: ModelCheckpoint) -> Path:
    return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"


def last_checkpoints(trainer) -> list[Path] | None:
    """The `last*.ckpt` files (or sharded directories) `--ckpt_path last` can resume from; None when
    no ModelCheckpoint names its directory (Lightning picks one under the logger's version)."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    if not any(cb.dirpath for cb in callbacks):
        return None
    found = []
    for cb in callbacks:
        if cb.dirpath and Path(cb.dirpath).is_dir():
            found += [p for p in Path(cb.dirpath).iterdir() if p.suffix == cb.FILE_EXTENSION and p.stem.split("-")[0] == cb.CHECKPOINT_NAME_LAST]
    return found


def continue_log_versions(trainer) -> None:
    """A resumed run logs into the latest version of each CSV/TensorBoard logger that has no fixed
    version, instead of a new `version_N+1`. The CSV rows logged before the checkpoint are kept
    (`InterruptCheckpoint.on_train_start` writes them back; rows after it are dropped, so a step
    is never logged twice)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    for logger in trainer.loggers:
        if not isinstance(logger, (CSVLogger, TensorBoardLogger)) or logger._version is not None:
            continue
        root = Path(logger.root_dir)
        versions = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
        if not versions:
            continue
        logger._version = max(versions)
        if isinstance(logger, CSVLogger):
            metrics = Path(logger.log_dir) / "metrics.csv"
            if metrics.exists():
                import csv

                with open(metrics, newline="") as f:
                    logger._r1l_previous_rows = list(csv.DictReader(f))
            # Lightning's CSV writer warns, then deletes metrics.csv; its rows are kept above.
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")


def _restore_log_rows(trainer) -> None:
    for logger in trainer.loggers:
        rows = getattr(logger, "_r1l_previous_rows", None)
        if rows is None:
            continue
        del logger._r1l_previous_rows
        if not trainer.is_global_zero:
            continue
        # A step's metrics are logged under step = global_step - 1; later rows come again after the resume.
        kept = [{k: v for k, v in row.items() if v not in ("", None)} for row in rows if int(row["step"]) < trainer.global_step]
        writer = logger.experiment
        for row in kept:
            row["step"] = int(row["step"])
        writer.metrics = kept + writer.metrics
        writer.save()


class InterruptCheckpoint(Checkpoint):
    """Ctrl-C, `kill` or a pre-emption loses no completed step.

    On SIGINT, SIGTERM or SIGUSR1 (SLURM's `--signal=USR1@<s>` warning; left alone when Lightning's
    SLURM auto-requeue handles it) the step in progress finishes, then `last.ckpt` is written into
    every `ModelCheckpoint(save_last=True)` directory (the same state a scheduled checkpoint holds,
    saved at the same point of the loop, so the resume is exact) and the run stops as Lightning stops
    on Ctrl-C (exit status 1). A second signal interrupts at once. All ranks stop together: the flag
    is reduced across them after every step.

    A `Checkpoint` subclass so that Lightning orders it after the other callbacks: ExactResume's
    data position is updated before the save.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._saved = False
        self._previous: dict[int, Any] = {}

    # -- signals -------------------------------------------------------------------------------
    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            current = signal.getsignal(signum)
            if name == "SIGUSR1" and current not in (signal.SIG_DFL, None):
                continue  # someone (Lightning's SLURM requeue) already handles it
            self._previous[signum] = current
            signal.signal(signum, self._handle)

    def _uninstall(self) -> None:
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self._uninstall()
            raise KeyboardInterrupt(f"second signal ({name})")
        self.received = name
        log.warning("%s: finishing this step, then writing a checkpoint and stopping (send it again to stop at once)", name)

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        _restore_log_rows(trainer)
        self.received, self._saved = None, False
        self._install()

    def on_train_end(self, trainer, pl_module) -> None:
        self._uninstall()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._uninstall()

    # Saved where ModelCheckpoint saves (after a step, after a validation); the run stops at the next
    # hook, once Lightning has logged the step's metrics.
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._save_if_signalled(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training and not trainer.sanity_checking:
            self._save_if_signalled(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training and not trainer.sanity_checking:
            self._stop_if_saved()

    def _stop_if_saved(self) -> None:
        if self._saved:
            self._uninstall()
            raise KeyboardInterrupt(self.received)

    def _save_if_signalled(self, trainer) -> None:
        if self._saved or not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        targets = [cb for cb in callbacks if cb.save_last] or callbacks[:1]
        written = []
        for cb in targets:
            path = _last_path(cb)
            if cb._last_global_step_saved != trainer.global_step or not path.exists():
                trainer.save_checkpoint(path)
            written.append(str(path))
        if trainer.is_global_zero:
            if written:
                log.warning("%s: step %d saved to %s; continue with --ckpt_path last",
                            self.received or "signal", trainer.global_step, ", ".join(written))
            else:
                log.warning("%s: no ModelCheckpoint with a dirpath; stopping at step %d without a checkpoint",
                            self.received or "signal", trainer.global_step)
        self._saved = True
