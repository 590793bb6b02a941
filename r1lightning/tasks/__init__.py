"""Synthetic verifiable tasks (the embedded default) and benchmark loaders."""

from r1lightning.tasks.arithmetic import AdditionTask, SyntheticTask
from r1lightning.tasks.general import InstructionTask, MixedTask

__all__ = ["AdditionTask", "InstructionTask", "MixedTask", "SyntheticTask"]
