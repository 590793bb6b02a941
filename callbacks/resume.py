"""The callbacks that make a run resumable; `PolicyModule.configure_callbacks` adds both to every run.

- `ExactResume`: what `--ckpt_path last` needs beyond Lightning's own state: the position inside
  the epoch, per-step RNG seeds, and checkpoint files written atomically.
- `InterruptCheckpoint`: on SIGINT (Ctrl-C), SIGTERM or SIGUSR1 (SLURM's pre-emption warning) the
  step in progress finishes, `last.ckpt` is written and the run exits; `--ckpt_path last` continues
  from that step. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from r1lightning.checkpointing import AtomicCheckpointIO, ResumableLoader, last_path, restore_log_rows
from r1lightning.seeding import seed_all, step_seed

log = logging.getLogger(__name__)


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
        restore_log_rows(trainer)
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
            path = last_path(cb)
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

