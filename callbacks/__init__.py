"""Every Lightning callback of the project (this folder is the package `r1lightning.callbacks`,
through the package-dir mapping in pyproject.toml). Add them to `trainer.callbacks` in YAML:

    trainer:
      callbacks:
        - class_path: r1lightning.callbacks.ReferenceModelRefresh
          init_args: {every_n_steps: 400}

ExactResume, NonFiniteGuard and InterruptCheckpoint are added to every run by the module
(`PolicyModule.configure_callbacks`), NoLearningSignal to every GRPO run; one listed in `trainer.callbacks` is kept as configured.
"""

from r1lightning.callbacks.benchmark import BenchmarkEval
from r1lightning.callbacks.no_signal import NoLearningSignal, NoLearningSignalError
from r1lightning.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from r1lightning.callbacks.reference import ReferenceModelRefresh, refresh_reference
from r1lightning.callbacks.rejection import RejectionSampling
from r1lightning.callbacks.rejection_filters import RejectionFilters
from r1lightning.callbacks.report import StageReport
from r1lightning.callbacks.resume import ExactResume, InterruptCheckpoint
from r1lightning.callbacks.reward_eval import HeldoutRewardEval

__all__ = ["BenchmarkEval", "ExactResume", "HeldoutRewardEval", "InterruptCheckpoint", "NoLearningSignal", "NoLearningSignalError", "NonFiniteError", "NonFiniteGuard",
           "ReferenceModelRefresh", "RejectionFilters", "RejectionSampling", "StageReport", "refresh_reference"]
