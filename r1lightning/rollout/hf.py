"""The reference sampler: transformers' `generate` with its dynamic KV cache."""

from __future__ import annotations

import torch

from r1lightning.rollout.base import Rollout, Sampler, SamplingParams, completion_mask_from_ids, seeded_rng


class HFGenerateSampler(Sampler):
    def __init__(self, return_logprobs: bool = True):
        self.return_logprobs = return_logprobs

    @torch.no_grad()
    def generate(self, model, prompt_ids, prompt_mask, params: SamplingParams, eos_token_id, pad_token_id) -> Rollout:
        kwargs = dict(do_sample=not params.greedy, max_new_tokens=params.max_new_tokens)
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        was_training = model.training
        model.eval()
        try:
            with seeded_rng(None if params.greedy else params.seed, prompt_ids.device):
                out = model.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                    use_cache=True,
                    return_dict_in_generate=True,
                    output_logits=self.return_logprobs,
                    **kwargs,
                )
        finally:
            model.train(was_training)
        completion_ids = out.sequences[:, prompt_ids.shape[1] :]
        # generate stops when every row is done, so the tensor may be shorter than max_new_tokens.
        mask, truncated = completion_mask_from_ids(completion_ids, eos_token_id)
        completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
        logprobs = None
        if self.return_logprobs:
            logits = torch.stack(out.logits, dim=1).float()  # [N, C, V] raw logits
            if not params.greedy:
                logits = logits / params.temperature
            logprobs = torch.log_softmax(logits, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
            logprobs = logprobs * mask
        return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, logprobs)
