"""LightningCLI for the project (imported by `r1lightning.cli` only for fit/validate/test/predict).

What it adds to Lightning's:
- config errors are one line with the file and the closest valid key (`r1lightning.cli.explain_config_error`);
- `--ckpt_path last` with no checkpoint is an error, not a fresh start;
- a resumed run logs into the logger version it resumes (`checkpointing.continue_log_versions`);
- a step-based progress bar (`step 93/250`) when the run is bounded by `max_steps`.
"""

from __future__ import annotations

import sys

import lightning as L
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n
from lightning.pytorch.cli import LightningCLI

# Library modules import their optional pieces lazily; the CLI imports the classes YAML may name.
import r1lightning.data  # noqa: F401
import r1lightning.grpo  # noqa: F401
import r1lightning.sft  # noqa: F401
from r1lightning.cli import explain_config_error
from r1lightning.errors import UserError
from r1lightning.checkpointing import continue_log_versions, last_checkpoints

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimizer steps (`max_steps`), not per epoch: the project's recipes are
    step-based (`max_epochs: -1`), where Lightning's bar reads `Epoch 8/-2`."""

    def _step_based(self, trainer) -> bool:
        return trainer.max_steps > 0

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not self._step_based(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            _update_n(bar, trainer.global_step)
        bar.set_description(f"step (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._step_based(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(n, self.train_progress_bar.total):
            _update_n(self.train_progress_bar, n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._step_based(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class R1CLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Parse errors come back as exceptions (not a usage dump and exit) so they can be one line.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False, **{c: {"exit_on_error": False} for c in SUBCOMMANDS}})
        given = kwargs.get("args")
        self._argv = list(sys.argv[1:] if given is None else given)
        super().__init__(L.LightningModule, L.LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        # Lightning's version warns when `args` is given while sys.argv holds arguments too; the
        # project always hands over the full argv (the pipeline's in-process stages, tests), so
        # parse it as Lightning does, without that warning.
        try:
            if isinstance(args, (dict, Namespace)):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except ArgumentError as err:
            sub = next((a for a in self._argv if a in SUBCOMMANDS), None)
            target = getattr(self, "_subcommand_parsers", {}).get(sub, parser) if sub else parser
            valid = {a.dest.split(".")[0] for a in target._actions if a.dest} | {"config"}
            raise UserError(explain_config_error(self._argv, valid, str(err))) from None

    def instantiate_classes(self) -> None:
        # A module's __init__ that rejects the user's input (a model path that does not exist) is
        # reported by jsonargparse inside a long Union-subtype error; the user's error is the cause.
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = err
            while cause is not None and not isinstance(cause, (UserError, FileNotFoundError)):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def after_instantiate_classes(self) -> None:
        trainer = self.trainer
        # Lightning's default bar counts batches per epoch; the recipes are bounded by steps.
        bars = [i for i, cb in enumerate(trainer.callbacks) if type(cb) is TQDMProgressBar]
        for i in bars:
            old = trainer.callbacks[i]
            trainer.callbacks[i] = StepProgressBar(refresh_rate=old.refresh_rate, leave=old._leave)
        if self.subcommand != "fit":
            return
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path == "last":
            checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
            if not last_checkpoints(trainer):
                where = ", ".join(str(cb.dirpath) for cb in checkpoints if cb.dirpath) or "(no ModelCheckpoint with a dirpath)"
                raise UserError(f"--ckpt_path last: no checkpoint to resume in {where}; run without --ckpt_path to start from step 0")
        if ckpt_path:
            continue_log_versions(trainer)
