"""Checkpoint files and what a resume needs beyond Lightning's own state.

- `AtomicCheckpointIO`: a checkpoint file is written beside its final name, fsynced and renamed.
- `ResumableLoader`: a training DataLoader whose position inside the epoch is checkpointed.
- `last_checkpoints`: what `--ckpt_path last` can resume from.
- `continue_log_versions` / `restore_log_rows`: a resumed run logs into the version it resumes,
  without logging a step twice.

The callbacks that use them (`ExactResume`, `InterruptCheckpoint`) are in `r1lightning.callbacks`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


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



# -- resuming: which checkpoint, which log version ----------------------------------------------
def last_path(cb: ModelCheckpoint) -> Path:
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



def restore_log_rows(trainer) -> None:
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

