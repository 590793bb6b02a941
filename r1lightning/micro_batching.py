"""GRPO's log-prob passes: how a step's sequences split into micro-batches, and the frozen passes over them.

`GRPOModule` mixes this in. Sequences with a loss are bucketed by length under a token budget
(`micro_batch_tokens`, or a grown one with `grow_micro_batches`) and packed into rows
(`r1lightning.logprobs`); each micro-batch's model input is laid out once per step (`LayoutCache`) and
reused by the old-policy and update passes, which therefore see identical inputs. The reference pass,
without autograd, runs larger micro-batches of its own (`reference_micro_batch_tokens`), laid out in the
same cache. `attention_for` picks the SDPA kernels of one micro-batch (`r1lightning.cudnn_gate`).
"""

from __future__ import annotations

import contextlib

import torch

from r1lightning.cudnn_gate import RecurringShapes, cudnn_attention
from r1lightning.logprobs import (
    LayoutCache, grown_token_budget, pack_rows, pack_sequences, padded_layout, plan_micro_batches, sequence_lengths,
)
from r1lightning.rollout import Rollout


class MicroBatching:
    """Needs `hparams` (packing, micro_batch_tokens, micro_batch_size, grow_micro_batches, logprob_impl),
    `model`, `tokenizer`, `sampling`, `device` and `forward_logprobs` from the module."""

    _layouts: LayoutCache | None = None
    _token_cost: float | None = None  # activation bytes per micro-batch token, learned from the last update
    _cudnn_shapes: RecurringShapes | None = None  # Policy.cudnn_attention auto: shapes from earlier steps

    def next_step_shapes(self) -> None:
        """A new step for `attention_for` (Policy.cudnn_attention auto)."""
        if getattr(self.policy, "cudnn_attention", False) == "auto":
            self._cudnn_shapes = self._cudnn_shapes or RecurringShapes()
            self._cudnn_shapes.next_step()

    def attention_for(self, rollout: Rollout, rows: list[int]):
        """The SDPA kernels of one micro-batch's pass, its forward and backward (`r1lightning.cudnn_gate`):
        with `auto`, cuDNN when the micro-batch's input shape ran in an earlier step."""
        if self._cudnn_shapes is None:
            return contextlib.nullcontext()
        shape = tuple(self.layout(rollout, rows or [0]).input_ids.shape)
        return cudnn_attention(self._cudnn_shapes.allow(shape))

    def micro_batches(self, rollout: Rollout, mask: torch.Tensor | None = None, token_budget: int | None = None) -> list[list[int]]:
        """Row indices of each forward/backward. Packed: rows with a loss (`mask`), bucketed by length
        under `token_budget` (default `micro_batch_tokens`); padded: consecutive rows. Under several
        processes every rank gets the same number of micro-batches (FSDP/DDP run collectives in each
        forward/backward); an empty list is a forward whose loss counts zero."""
        h = self.hparams
        budget = token_budget or h.micro_batch_tokens
        n = rollout.completion_ids.shape[0]
        if h.packing:
            active = list(range(n)) if mask is None else mask.sum(-1).nonzero().squeeze(-1).tolist()
            lengths = self.row_lengths(rollout)
            micro = [[active[k] for k in mb] for mb in plan_micro_batches([lengths[i] for i in active], budget, h.micro_batch_size)]
        else:
            width = rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]
            size = h.micro_batch_size or max(1, budget // width)
            micro = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        return micro + [[] for _ in range(self._max_across_ranks(len(micro)) - len(micro))]

    @staticmethod
    def row_lengths(rollout: Rollout) -> list[int]:
        """Prompt + completion tokens of each row, without padding, as a host list."""
        prompt, completion = sequence_lengths(rollout.prompt_mask, rollout.completion_mask)
        return (prompt + completion).tolist()

    def input_tokens(self, rollout: Rollout, micro: list[list[int]], lengths: list[int] | None = None) -> list[int]:
        """Each micro-batch's model input in tokens, padding included (what its activations scale with)."""
        if self.hparams.packing:
            lengths = self.row_lengths(rollout) if lengths is None else lengths
            return [len(pack_rows([lengths[i] for i in rows])) * max(lengths[i] for i in rows) if rows else 0 for rows in micro]
        width = rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]
        return [len(rows) * width for rows in micro]

    def padding_fraction(self, rollout: Rollout, micro: list[list[int]]) -> float:
        """Share of the update's input tokens that are padding (0 when every row is packed full)."""
        lengths = self.row_lengths(rollout)
        real = sum(lengths[i] for rows in micro for i in rows)
        padded = sum(self.input_tokens(rollout, micro, lengths))
        return 1.0 - real / padded if padded else 0.0

    def token_budget(self, rollout_peak_bytes: float | None) -> int:
        """This step's micro-batch token budget (`grow_micro_batches`)."""
        h = self.hparams
        if not h.grow_micro_batches or self._token_cost is None or rollout_peak_bytes is None:
            return h.micro_batch_tokens
        headroom = rollout_peak_bytes - torch.cuda.memory_allocated(self.device) - self._gradient_bytes()
        return grown_token_budget(h.micro_batch_tokens, headroom, self._token_cost)

    def _gradient_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def learn_token_cost(self, base_bytes: int, peak_bytes: int, tokens: list[int]) -> None:
        """Activation bytes per input token of the update just run: its peak less what it held at the start and
        the gradients, over its largest micro-batch (learned from micro-batches of at least 1,024 tokens)."""
        largest = max(tokens, default=0)
        if largest >= 1024:
            self._token_cost = max(1.0, (peak_bytes - base_bytes - self._gradient_bytes()) / largest)

    def _max_across_ranks(self, count: int) -> int:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return count
        t = torch.tensor([count], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t)

    def prepare_layouts(self, rollout: Rollout, micro: list[list[int]]) -> None:
        """Every micro-batch's model input for this step, built at once (`LayoutCache`)."""
        self._layouts = LayoutCache(rollout, micro, self._build_layout)

    def rows_index(self, rollout: Rollout, rows: list[int]):
        """`rows` as a device index when prepared (a list index copies from the host and synchronises)."""
        hit = self._layouts.get(rollout, rows) if getattr(self, "_layouts", None) else None
        return rows if hit is None else hit[1]

    def layout(self, rollout: Rollout, rows: list[int]):
        hit = self._layouts.get(rollout, rows) if getattr(self, "_layouts", None) else None
        return self._build_layout(rollout, rows) if hit is None else hit[0]

    def _build_layout(self, rollout: Rollout, rows: list[int]):
        if self.hparams.packing:
            return pack_sequences(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                  rollout.completion_mask, rows, self.tokenizer.pad_token_id)
        return padded_layout(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, rows)

    def completion_logprobs(self, rollout: Rollout, rows, model=None, with_entropy=False):
        """Per-token log-probs [n, C] of the completion tokens of `rows` (temperature-scaled, as
        sampled), their entropies [n, C] (no grad) if asked, and the load-balancing loss.
        Computed from the final hidden states chunk by chunk: no [n, C, V] logits."""
        if isinstance(rows, slice):
            rows = list(range(rollout.completion_ids.shape[0]))[rows]
        layout = self.layout(rollout, rows)
        return self.forward_logprobs(layout, model, self.sampling.temperature, with_entropy, self.hparams.logprob_impl)

    @torch.no_grad()
    def frozen_logprobs(self, rollout: Rollout, model, micro: list[list[int]] | None = None) -> torch.Tensor:
        """[N, C] log-probs under `model` (old policy or reference), over the same micro-batches as
        the update; rows left out of every micro-batch (no loss) hold 0."""
        micro = self.micro_batches(rollout) if micro is None else micro
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
        for rows in micro:
            with self.attention_for(rollout, rows):
                logp, _, _ = self.completion_logprobs(rollout, rows or [0], model)
            if rows:
                out[self.rows_index(rollout, rows)] = logp
        return out
