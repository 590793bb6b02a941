"""A learned reward: any sequence-classification checkpoint (a directory or a hub id) as a reward function.

In YAML, by name or in TRL's form (a model id string where a reward function would go):

    rewards:
      - {fn: reward_model, kwargs: {model: runs/quickstart/pipeline/reward_model/model, scope: answer}}
      - {fn: Skywork/Skywork-Reward-V2-Llama-3.1-8B, kinds: [general]}   # a hub id as `fn`

DeepSeek-R1 (stage 4) judges helpfulness on the final summary only and harmlessness on the whole
response: `scope: answer` scores the text after the last `</think>` (empty when the reasoning was
never closed), `scope: full` the whole completion.

The model is loaded on first call, on this process's accelerator (`torch.cuda.current_device()`,
which Lightning sets per rank) in bfloat16, or on the CPU in float32, and scored in batches under
`no_grad`. It is kept outside the LightningModule, so DDP / FSDP neither wrap nor shard it: every
rank holds its own frozen copy and scores only its own rows; no collective is involved, so ranks
with different numbers of rows never wait on each other.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from r1lightning.data.preference import encode_reward_texts, reward_text, right_pad
from r1lightning.errors import UserError
from r1lightning.rewards import register_reward

log = logging.getLogger(__name__)

SCOPES = ("answer", "full")
NORMALIZE = (None, "none", "batch", "sigmoid")
END_THINK = "</think>"
# Loaded models by (id, revision, device, dtype): two rewards on one checkpoint (helpfulness on the
# answer, harmlessness on the whole response) share one copy of its weights.
_LOADED: dict[tuple, tuple] = {}


def looks_like_model(name: str) -> bool:
    """A directory, or a hub id `org/name` (import paths use dots and colons, never a slash)."""
    return "/" in name or Path(name).expanduser().is_dir()


def answer_part(completion: Any, end_think: str = END_THINK) -> Any:
    """The text after the last `end_think` ("" when there is none); message lists: in their last turn."""
    if isinstance(completion, list):
        if not completion:
            return completion
        *head, last = completion
        return [*head, {**last, "content": answer_part(last["content"], end_think)}]
    text = str(completion)
    at = text.rfind(end_think)
    return "" if at < 0 else text[at + len(end_think):]


@register_reward("reward_model")
class RewardModelReward:
    is_reward_model = True

    def __init__(
        self,
        model: str,
        scope: str = "answer",
        batch_size: int = 32,
        max_length: int | None = 2048,
        normalize: str | None = None,
        shift: float = 0.0,
        scale: float = 1.0,
        dtype: str = "auto",
        device: str | None = None,
        include_prompt: bool = True,
        end_think: str = END_THINK,
        no_answer: float | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            model: a `save_pretrained` directory or a hub id of an `AutoModelForSequenceClassification`
                checkpoint with one label (e.g. one trained by `RewardModelModule`).
            scope: `answer` (text after the last `</think>`: helpfulness) or `full` (whole completion:
                harmlessness).
            batch_size: sequences per forward.
            max_length: longer inputs keep their last `max_length` tokens (None: no limit).
            normalize: None (raw score, after shift/scale), `sigmoid` (into (0, 1), like the rule
                rewards) or `batch` (standardised over the rows of this call).
            shift, scale: score = (raw - shift) / scale before `normalize` (e.g. the mean and std of
                the model's scores on its validation set).
            dtype: `auto` (bfloat16 on GPU, float32 on CPU), `float32`, `bfloat16`, `float16`.
            device: where the model runs; default: this rank's current CUDA device, else the CPU.
            include_prompt: score the prompt with the completion (as the model was trained).
            end_think: the tag that closes the reasoning.
            no_answer: with `scope: answer`, the reward of a completion that never closes its reasoning
                (no summary to judge), instead of the model's score of an empty answer, which a model
                never trained on empty answers may rate well (a hole a policy finds). None: score it.
        """
        if scope not in SCOPES:
            raise UserError(f"reward_model.scope: {scope!r} is not one of {', '.join(SCOPES)}")
        if normalize not in NORMALIZE:
            raise UserError(f"reward_model.normalize: {normalize!r} is not one of none, batch, sigmoid")
        if scale == 0:
            raise UserError("reward_model.scale: must not be 0")
        # Existence is checked on first use: in a pipeline the directory is written by an earlier stage.
        self.model_name = model
        self.scope, self.batch_size, self.max_length = scope, batch_size, max_length
        self.normalize = None if normalize == "none" else normalize
        self.shift, self.scale = float(shift), float(scale)
        self.dtype, self.device = dtype, device
        self.include_prompt, self.end_think, self.no_answer = include_prompt, end_think, no_answer
        self.revision, self.trust_remote_code = revision, trust_remote_code
        self.model = self.tokenizer = None
        self.truncated = 0

    def __repr__(self) -> str:
        return f"RewardModelReward(model={self.model_name!r}, scope={self.scope!r}, normalize={self.normalize!r})"

    # -- loading -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def load(self):
        if self.model is not None:
            return self.model
        from transformers import AutoModelForSequenceClassification

        from r1lightning.tokenizer import load_tokenizer

        device = self._device()
        dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if self.dtype == "auto" else getattr(torch, self.dtype)
        key = (self.model_name, self.revision, str(device), str(dtype))
        if key in _LOADED:
            self.tokenizer, self.model = _LOADED[key]
            return self.model
        if (self.model_name.startswith((".", "/", "~")) or self.model_name.count("/") > 1) and not Path(self.model_name).expanduser().exists():
            raise FileNotFoundError(f"reward_model.model: path does not exist: {self.model_name}")
        try:
            tok = load_tokenizer(self.model_name, revision=self.revision, trust_remote_code=self.trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                self.model_name, dtype=dtype, revision=self.revision, trust_remote_code=self.trust_remote_code)
        except OSError as err:
            raise FileNotFoundError(f"reward_model.model: cannot load {self.model_name!r}: {str(err).splitlines()[0]}") from None
        if model.config.num_labels != 1:
            raise UserError(f"reward_model.model: {self.model_name} has {model.config.num_labels} labels; a reward model has 1")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        self.tokenizer, self.model = tok, model.to(device).eval().requires_grad_(False)
        _LOADED[key] = (self.tokenizer, self.model)
        log.info("reward model %s on %s (%s), rank %s", self.model_name, device, dtype, os.environ.get("RANK", "0"))
        return self.model

    # -- scoring -------------------------------------------------------------------------------
    def texts(self, prompts: list, completions: list) -> list[str]:
        if self.scope == "answer":
            completions = [answer_part(c, self.end_think) for c in completions]
        prompts = prompts if self.include_prompt else [None] * len(completions)
        return [reward_text(self.tokenizer, p, c) for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def raw_scores(self, prompts: list, completions: list) -> torch.Tensor:
        """[N] float32 scores straight from the model, on the CPU."""
        from r1lightning.reward_model import sequence_scores

        model = self.load()
        ids, truncated = encode_reward_texts(self.tokenizer, self.texts(prompts, completions), self.max_length)
        self.truncated += truncated
        device = next(model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
        out = torch.empty(len(ids), dtype=torch.float32)
        for start in range(0, len(ids), self.batch_size):
            rows = order[start : start + self.batch_size]
            input_ids, mask = right_pad([ids[i] for i in rows], self.tokenizer.pad_token_id)
            out[rows] = sequence_scores(model, input_ids.to(device), mask.to(device)).float().cpu()
        return out

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        if not completions:
            return []
        missing = [False] * len(completions)
        if self.scope == "answer" and self.no_answer is not None:
            missing = [self.end_think not in (c[-1]["content"] if isinstance(c, list) and c else str(c)) for c in completions]
        keep = [i for i, m in enumerate(missing) if not m]
        out: list = [None if self.no_answer is None else float(self.no_answer)] * len(completions)
        if not keep:
            return out
        scores = (self.raw_scores([prompts[i] for i in keep], [completions[i] for i in keep]) - self.shift) / self.scale
        if self.normalize == "sigmoid":
            scores = torch.sigmoid(scores)
        elif self.normalize == "batch" and len(scores) > 1:
            scores = (scores - scores.mean()) / scores.std().clamp(min=1e-6)
        for i, v in zip(keep, scores.tolist()):
            out[i] = v
        return out
