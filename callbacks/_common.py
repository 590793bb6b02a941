"""Helpers shared by the stage callbacks: atomic files, ranks, logging outside `self.log`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from r1lightning.files import atomic_write


def write_table(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL or Parquet (by suffix), atomically."""
    path = Path(path)

    def write(tmp: Path) -> None:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    return atomic_write(path, write)


def write_json(path: str | Path, obj: Any) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, default=_json_default)
            f.write("\n")

    return atomic_write(path, write)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world(trainer) -> tuple[int, int]:
    if trainer is not None and hasattr(trainer, "global_rank"):
        return int(trainer.global_rank), int(trainer.world_size)
    if is_dist():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def needs_lockstep(trainer) -> bool:
    """True when every generate call is a collective (FSDP: the policy's shards are gathered), so
    all ranks must make the same number of calls even when their shares of the work differ."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return False
    return bool(getattr(strategy, "gather_for_rollout", False)) or "fsdp" in type(strategy).__name__.lower()


def barrier(trainer, name: str) -> None:
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None:
        strategy.barrier(name)
    elif is_dist():
        torch.distributed.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a collective: all ranks must call it)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def log_metrics(trainer, metrics: dict[str, float]) -> None:
    """Send metrics to the trainer's loggers (rank 0) and to `callback_metrics` (every rank).

    `self.log` is refused in `on_train_end` and only reaches the logger every `log_every_n_steps`;
    these are rare, already-synchronised values, so they go to the loggers directly.
    """
    if trainer is None:
        return
    values = {k: float(v) for k, v in metrics.items()}
    if hasattr(trainer, "callback_metrics"):
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
    if getattr(trainer, "global_rank", 0) != 0:
        return
    for logger in getattr(trainer, "loggers", []) or []:
        logger.log_metrics(values, step=trainer.global_step)
        logger.save()


def crossed_multiple(previous_step: int, step: int, every: int) -> bool:
    """True if a multiple of `every` lies in (previous_step, step]. With mu > 1 optimizer steps per
    batch (GRPO) the step counter jumps, so testing `step % every == 0` would miss some."""
    return every > 0 and step // every > previous_step // every
