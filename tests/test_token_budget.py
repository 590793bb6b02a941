"""`grow_micro_batches`: the update's token budget grows into memory the rollout already used, at the
per-token cost measured in the previous update (hand-computed bytes; the GPU figures are in
docs/benchmarks.md)."""

import torch

from r1lightning.logprobs import GROW_MARGIN, grown_token_budget

GIB = 2**30


def test_grown_budget_fills_the_headroom_at_the_measured_cost():
    # 40 GiB of headroom at 0.5 MiB a token: 0.8 x 81,920 tokens
    assert grown_token_budget(8192, 40 * GIB, 0.5 * 2**20) == int(GROW_MARGIN * 81920) == 65536
    assert grown_token_budget(8192, 1 * GIB, 0.5 * 2**20) == 8192  # 1,638 tokens: never below the default
    assert grown_token_budget(8192, -5 * GIB, 0.5 * 2**20) == 8192  # the update itself is the step's peak
    assert grown_token_budget(8192, 40 * GIB, 0.0) == 8192  # nothing measured


def test_the_module_learns_the_cost_and_grows_the_next_budget(tiny_moe_config, monkeypatch):
    from tests.test_grpo import _fixed_rollout, tiny_module

    module = tiny_module(tiny_moe_config, micro_batch_size=None, micro_batch_tokens=16, grow_micro_batches=True)
    grads = module._gradient_bytes()
    assert grads == sum(p.numel() for p in module.model.parameters()) * 4  # fp32, every parameter trains
    assert module.token_budget(100 * GIB) == 16  # nothing learned yet: the configured budget
    module.learn_token_cost(base_bytes=10 * GIB, peak_bytes=10 * GIB + grads + 512 * 2**20, tokens=[0, 2048, 1024])
    assert module._token_cost == 256 * 1024  # 512 MiB over the largest micro-batch's 2,048 tokens
    module.learn_token_cost(base_bytes=0, peak_bytes=10**12, tokens=[512])  # too small to learn from: kept
    assert module._token_cost == 256 * 1024
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * GIB)
    # rollout peak 60 GiB, 20 GiB held, the gradients to come: 0.8 x (40 GiB - grads) / 256 KiB
    assert module.token_budget(60 * GIB) == int(0.8 * (40 * GIB - grads) / (256 * 1024))
    assert module.token_budget(None) == 16  # no CUDA peak: the configured budget
    rollout = _fixed_rollout(module)
    mask = rollout.completion_mask.float()
    tokens = module.input_tokens(rollout, module.micro_batches(rollout, mask, 16))
    assert len(tokens) > 1 and all(0 < t for t in tokens)
    assert len(module.micro_batches(rollout, mask, 10**6)) == 1  # a grown budget: one micro-batch


def test_budget_stays_the_configured_one_unless_asked(tiny_moe_config):
    from tests.test_grpo import tiny_module

    module = tiny_module(tiny_moe_config, micro_batch_tokens=16)  # grow_micro_batches: false, the default
    module._token_cost = 1.0
    assert module.token_budget(100 * GIB) == 16
