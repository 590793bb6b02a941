"""Samplers: turn a batch of prompts into completions with the policy's current weights.

Every sampler returns a `Rollout` with the same layout, so GRPO, rejection sampling and evaluation
never care which engine produced it.
"""

from r1lightning.rollout.base import Rollout, Sampler, SamplingParams
from r1lightning.rollout.engine import StaticCacheSampler
from r1lightning.rollout.hf import HFGenerateSampler
from r1lightning.rollout.paged import PagedSampler

__all__ = ["Rollout", "Sampler", "SamplingParams", "HFGenerateSampler", "PagedSampler", "StaticCacheSampler"]
