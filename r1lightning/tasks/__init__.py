"""Synthetic verifiable tasks (the embedded default) and benchmark loaders."""

from r1lightning.tasks.arithmetic import AdditionTask, SyntheticTask
from r1lightning.tasks.general import InstructionTask, MixedTask
from r1lightning.tasks.long_arithmetic import LongSumTask

__all__ = ["AdditionTask", "InstructionTask", "LongSumTask", "MixedTask", "SyntheticTask"]
