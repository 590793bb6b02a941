"""Stage callbacks (importable as `r1lightning.callbacks`): add them to `trainer.callbacks` in YAML.

    trainer:
      callbacks:
        - class_path: r1lightning.callbacks.ReferenceModelRefresh
          init_args: {every_n_steps: 400}
"""

from r1lightning.callbacks.benchmark import BenchmarkEval
from r1lightning.callbacks.reference import ReferenceModelRefresh, refresh_reference
from r1lightning.callbacks.rejection import RejectionSampling
from r1lightning.callbacks.report import StageReport
from r1lightning.callbacks.reward_eval import HeldoutRewardEval

__all__ = ["BenchmarkEval", "HeldoutRewardEval", "ReferenceModelRefresh", "RejectionSampling", "StageReport", "refresh_reference"]
