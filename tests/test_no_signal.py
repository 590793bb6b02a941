"""A GRPO run whose groups all score alike cannot learn: it stops with one line saying why."""

from types import SimpleNamespace

import pytest
import torch

from r1lightning.callbacks import NoLearningSignal, NoLearningSignalError
from r1lightning.errors import UserError


def feed(cb, flats, reward=0.1):
    trainer = SimpleNamespace(callback_metrics={}, global_step=0)
    for step, flat in enumerate(flats):
        trainer.global_step = step + 1
        trainer.callback_metrics = {"train/frac_reward_zero_std": torch.tensor(flat), "train/reward": torch.tensor(reward)}
        cb.on_train_batch_end(trainer, None, None, None, step)


def test_stops_when_the_window_is_flat_on_average_even_with_stray_groups():
    cb = NoLearningSignal(window=20)
    # the long-reasoning run of 2026-11-30: 32 groups, now and then one varied (31/32 = 96.9 % flat)
    flats = [1.0, 1.0, 1.0, 31 / 32] * 5  # mean 0.992 over 20 batches
    with pytest.raises(NoLearningSignalError, match=r"^stopping at step 20: over the last 20 batches 99\.2 % of the groups"):
        feed(cb, flats)
    assert isinstance(NoLearningSignalError("x"), UserError)  # the CLI prints it as one line, exit 2


def test_keeps_going_while_some_groups_carry_signal_or_the_window_is_not_full():
    feed(NoLearningSignal(window=20), [1.0] * 19)  # not a full window yet
    feed(NoLearningSignal(window=20), [1.0, 1.0, 0.9375] * 10)  # 1 of 16 groups varies every third step: 97.9 %
    feed(NoLearningSignal(window=3), [0.5, 1.0, 1.0, 1.0][:3])  # mean 0.83


def test_resume_keeps_the_window():
    cb = NoLearningSignal(window=4)
    feed(cb, [1.0, 1.0, 1.0])
    again = NoLearningSignal(window=4)
    again.load_state_dict(cb.state_dict())
    with pytest.raises(NoLearningSignalError):
        feed(again, [1.0])


def test_every_grpo_run_gets_it_unless_turned_off(tiny_moe_config):
    from r1lightning import Policy
    from r1lightning.grpo import GRPOModule

    def names(**kwargs):
        module = GRPOModule(Policy(config=tiny_moe_config, tokenizer="char"), rewards=["accuracy"], **kwargs)
        return {type(cb).__name__: cb for cb in module.configure_callbacks()}

    assert names()["NoLearningSignal"].window == 50 and "NonFiniteGuard" in names()
    assert names(max_flat_steps=8)["NoLearningSignal"].window == 8
    assert "NoLearningSignal" not in names(max_flat_steps=None)
