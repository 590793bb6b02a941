from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None  # per-call generator seed; None uses the global RNG

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device):
    """Draws inside come from `seed` (CPU and every CUDA default generator), and the global RNG is as
    it was afterwards; `seed` None: the global RNG, untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@dataclass
class Rollout:
    """N sequences = prompts x samples. Prompts are left-padded, completions right-padded."""

    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, C] pad after EOS
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first EOS
    truncated: torch.Tensor  # [N] bool: no EOS within max_new_tokens
    logprobs: torch.Tensor | None = None  # [N, C] log-prob of each sampled token under the sampling distribution

    @property
    def completion_lengths(self) -> torch.Tensor:  # [N]
        return self.completion_mask.sum(-1)

    def input_ids(self) -> torch.Tensor:  # [N, P + C]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:  # [N, P + C]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


class Sampler:
    """Interface: `generate(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id)`.

    `model` is the live policy (no copy), so every optimizer update is seen by the next call.
    """

    def generate(
        self,
        model: torch.nn.Module,
        prompt_ids: torch.Tensor,  # [N, P] left-padded
        prompt_mask: torch.Tensor,  # [N, P]
        params: SamplingParams,
        eos_token_id: int | list[int],
        pad_token_id: int,
    ) -> Rollout:
        raise NotImplementedError

    def release_for_update(self) -> None:
        """Called by GRPO after a rollout is scored, before the policy update: a sampler that holds
        device memory between calls (KV cache, graph pools) may free it here. Default: nothing."""


def completion_mask_from_ids(
    completion_ids: torch.Tensor, eos_token_id: int | list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS; rows without an EOS are truncated."""
    eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos)  # [N, C]
    # Number of EOS tokens strictly before each position: 0 means "still inside the completion".
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    mask = (before == 0).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def pad_completions(rollout: Rollout, width: int, pad_token_id: int) -> Rollout:
    """The same rollout with completions right-padded to `width` (samplers may stop early)."""
    extra = width - rollout.completion_ids.shape[1]
    if extra <= 0:
        return rollout

    def pad(t, value):
        return None if t is None else torch.nn.functional.pad(t, (0, extra), value=value)

    return Rollout(
        rollout.prompt_ids, rollout.prompt_mask, pad(rollout.completion_ids, pad_token_id),
        pad(rollout.completion_mask, 0), rollout.truncated, pad(rollout.logprobs, 0.0),
    )


def replace_rows(dst: Rollout, dst_rows: torch.Tensor, src: Rollout, src_rows: torch.Tensor, pad_token_id: int) -> Rollout:
    """A new rollout: `dst` with rows `dst_rows` taken from `src` rows `src_rows` (same prompts, new
    completions). Neither argument is changed."""
    width = max(dst.completion_ids.shape[1], src.completion_ids.shape[1])
    dst, src = pad_completions(dst, width, pad_token_id), pad_completions(src, width, pad_token_id)
    columns = {}
    for name in ("completion_ids", "completion_mask", "truncated", "logprobs"):
        a, b = getattr(dst, name), getattr(src, name)
        if a is not None and b is not None:
            a = a.clone()
            a[dst_rows] = b[src_rows]
        columns[name] = a
    return dataclasses.replace(dst, **columns)


# A rollout engine's counters (`last_stats`) logged each GRPO step: the metric, and how a step's sampling calls
# combine. `rollout/preempted` > 0: the KV pool could not hold every live sequence (PagedSampler warns once).
ENGINE_STATS = {"steps": ("rollout/decode_steps", "sum"), "preempted": ("rollout/preempted", "sum"),
                "prefill_tokens": ("rollout/prefill_tokens", "sum"), "max_live": ("rollout/max_live", "max"),
                "kv_bytes": ("rollout/kv_GiB", "max")}


def add_engine_stats(acc: dict, last: dict | None) -> None:
    """Adds one sampling call's engine counters to `acc`, the step's `rollout/*` metrics: summed over the
    step's calls (dynamic sampling's retries), or the largest. A sampler without counters adds nothing."""
    for key, (name, how) in ENGINE_STATS.items() if last else ():
        if last.get(key) is None:
            continue
        value = float(last[key]) / (2**30 if key == "kv_bytes" else 1)
        before = acc.get(name)
        acc[name] = value if before is None else (before + value if how == "sum" else max(before, value))
