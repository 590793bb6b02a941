"""The CLI's progress bar counts the run's optimizer steps (`max_steps`), not batches per epoch."""

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from r1lightning.lightning_cli import StepProgressBar


def test_step_based_run_shows_steps_of_max_steps(tmp_path):
    bar = StepProgressBar()
    model = BoringModel()  # 64 batches an epoch
    trainer = L.Trainer(accelerator="cpu", max_steps=100, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar], default_root_dir=tmp_path)
    trainer.fit(model)
    # 100 steps cross an epoch boundary (64 batches an epoch): still one bar over the whole run.
    assert bar.train_progress_bar.total == 100 and bar.train_progress_bar.n == 100
    assert bar.train_progress_bar.desc.startswith("step (epoch 1)")
