"""Synthetic verifiable tasks (the embedded default) and benchmark loaders."""

from r1lightning.tasks.arithmetic import AdditionTask, SyntheticTask

__all__ = ["AdditionTask", "SyntheticTask"]
