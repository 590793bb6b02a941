"""Per-token log-probs from the final hidden states, without the [n, C, V] logits.

GRPO needs, for each completion token, ``log softmax(h W^T / T)[target]`` under the policy, the
sampling ("old") policy and the reference. Materialising the logits costs ``tokens x V x 4`` bytes
in fp32, and the log-softmax, the entropy and their gradients as much again: 32 x 1,024 x 50,304 x 4 B
= 6.6 GB per tensor for one micro-batch of the OLMoE shape. Here the LM head runs chunk by chunk
over tokens inside a custom autograd function: the forward keeps only the log-sum-exp per token, the
backward recomputes each chunk's logits, so the largest transient is ``chunk x V`` fp32 and what
survives to backward is the ``[tokens, H]`` hidden states the model keeps anyway.

The head is swapped in *inside* the model's forward (`head_logprobs`): the model's own forward
still runs (MoE load-balancing loss, FSDP2's unshard/reshard hooks of the root unit that owns the
head), only the output projection is replaced by the chunked one for the positions that have a
target, and the log-probs come back as the model's `logits` output (FSDP2 gathers the head again
for backward through hooks on the forward's outputs).

Packing (`pack_sequences`): the sequences of a micro-batch are laid end to end in rows, position ids
restarting at every sequence and no attention mask, which transformers (>= 5) reads as packed
sequences: attention stays inside each one (flash-attention: varlen; sdpa/eager/flex: a
block-diagonal causal mask, built only when a row holds more than one sequence).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from r1lightning.errors import UserError

__all__ = [
    "LOGPROB_IMPLS",
    "token_logprobs",
    "head_logprobs",
    "Layout",
    "pack_sequences",
    "padded_layout",
    "plan_micro_batches",
    "liger_available",
]

LOGPROB_IMPLS = ("chunked", "liger", "full")

# fp32 logits of one chunk: chunk x V x 4 B. The forward holds one such tensor, the backward
# about three (logits, probabilities, their gradient in the weight's dtype), so 256 MiB per chunk
# bounds the transient at < 1 GiB for any vocabulary (V = 50,304: 1,334 tokens per chunk).
CHUNK_BYTES = 256 * 2**20


def default_chunk_tokens(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * max(vocab, 1)))


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    z = (h @ weight.t()).float()  # [c, V] the head in the weight's dtype, as nn.Linear would
    if bias is not None:
        z = z + bias.float()
    if temperature != 1.0:
        z = z / temperature
    return z


class _ChunkedLogProbs(torch.autograd.Function):
    """logp[m] = log_softmax(h[m] W^T / T)[target[m]]; entropy as a gradient-free side output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, want_entropy):
        M = hidden.shape[0]
        logp = hidden.new_empty(M, dtype=torch.float32)  # [M]
        lse = hidden.new_empty(M, dtype=torch.float32)  # [M]
        entropy = hidden.new_empty(M if want_entropy else 0, dtype=torch.float32)  # [M] or [0]
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            z = _logits(hidden[s:e], weight, bias, temperature)  # [c, V]
            lse_c = torch.logsumexp(z, dim=-1)  # [c]
            lse[s:e] = lse_c
            logp[s:e] = z.gather(-1, targets[s:e, None]).squeeze(-1) - lse_c
            if want_entropy:
                p = torch.exp(z - lse_c[:, None])  # [c, V]
                entropy[s:e] = lse_c - (p * z).sum(-1)
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        M = hidden.shape[0]
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            g = grad_logp[s:e].float()  # [c]
            z = _logits(hidden[s:e], weight, bias, T)  # [c, V] recomputed
            # d logp / d z = onehot(target) - softmax(z); z = logits / T
            dz = torch.exp(z - lse[s:e, None]).mul_(-g[:, None])  # [c, V]
            del z
            dz.scatter_add_(-1, targets[s:e, None], g[:, None])
            if T != 1.0:
                dz.div_(T)
            if need_b:
                grad_b += dz.sum(0)
            dz = dz.to(weight.dtype)  # the gradient that reaches the head's output, as for nn.Linear
            if need_h:
                grad_h[s:e] = dz @ weight
            if need_w:
                grad_w.add_(dz.t() @ hidden[s:e])
            del dz
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _full_logprobs(hidden, weight, bias, targets, temperature, want_entropy):
    """The unchunked reference: [M, V] fp32 logits at once (what the project did before)."""
    logp_all = torch.log_softmax(_logits(hidden, weight, bias, temperature), dim=-1)  # [M, V]
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = None
    if want_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def liger_available() -> bool:
    """liger-kernel (>= 0.8.5: per-token gradients with reduction='none') importable, and a GPU."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise
        return False
    return torch.cuda.is_available()


def _liger_logprobs(hidden, weight, bias, targets, temperature, want_entropy):
    """liger-kernel's fused linear cross-entropy (Triton, chunked over tokens), per token:
    logp = -CE((h W^T + b) / T), the temperature folded into the input and bias. liger has no
    entropy output, so the metric comes from a gradient-free pass of the chunked head."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    x = hidden / temperature if temperature != 1.0 else hidden
    b = bias / temperature if bias is not None and temperature != 1.0 else bias
    # positional: _input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    # label_smoothing, reduction, softcap, return_z_loss, accum_dtype
    loss = LigerFusedLinearCrossEntropyFunction.apply(
        x, weight, targets, b, None, -100, 0.0, 0.0, "none", None, False, torch.float32)[0]  # [M]
    entropy = None
    if want_entropy:
        with torch.no_grad():
            entropy = _ChunkedLogProbs.apply(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                             targets, temperature, default_chunk_tokens(weight.shape[0]), True)[1]
    return -loss.float(), entropy


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: str = "chunked",
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs of `targets` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: [M, H] final hidden states (after the final norm), one row per predicted token.
        weight: [V, H] the LM head; bias: [V] or None.
        targets: [M] token ids.
        temperature: the sampling temperature (<= 0, greedy, is taken as 1).
        with_entropy: also return the entropy of each token's distribution (no gradient).
        impl: ``chunked`` (pure PyTorch, default), ``liger`` (Triton, CUDA), ``full`` (unchunked).
        chunk_tokens: tokens per chunk; default keeps one chunk's fp32 logits near 256 MiB.

    Returns:
        ``(logp [M] fp32, entropy [M] fp32 or None)``.
    """
    T = float(temperature) if temperature and temperature > 0 else 1.0
    if impl == "full":
        return _full_logprobs(hidden, weight, bias, targets, T, with_entropy)
    if impl == "liger":
        return _liger_logprobs(hidden, weight, bias, targets, T, with_entropy)
    if impl != "chunked":
        raise ValueError(f"unknown log-prob implementation {impl!r}; expected one of {LOGPROB_IMPLS}")
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    logp, entropy = _ChunkedLogProbs.apply(hidden, weight, bias, targets, T, chunk, with_entropy)
    return logp, (entropy if with_entropy else None)


# -- the head inside the model's forward --------------------------------------------------------
_UNSUPPORTED_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _check_head(model) -> torch.nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UserError(f"{type(model).__name__} has no output embedding (lm_head) to compute log-probs with")
    config = getattr(model, "config", None)
    for key in _UNSUPPORTED_HEAD:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise UserError(
                f"model.logprob_impl: {type(model).__name__} transforms its logits ({key}); "
                "the chunked head does not, so use logprob_impl: full for this model"
            )
    return head


@contextmanager
def head_logprobs(model, positions: Tensor, targets: Tensor, temperature: float, with_entropy: bool = False,
                  impl: str = "chunked", chunk_tokens: int | None = None):
    """Within this context, a forward of `model` computes log-probs instead of logits.

    The output projection (``model.get_output_embeddings()``) is replaced, for this context only,
    by one that takes the final hidden states ``[r, W, H]``, keeps the flat positions `positions`
    ``[M]`` (indices into ``r * W``) and computes ``log p(targets[m])`` there. The model's `logits`
    output is then these log-probs ``[M]``: use it, not a copy, as the loss input, since FSDP2
    unshards the head again for backward through hooks on the forward's outputs. Yields a dict
    that holds ``entropy [M] | None`` (no grad) after the forward.
    """
    head = _check_head(model)
    out: dict = {}

    def forward(hidden: Tensor) -> Tensor:
        r, W, H = hidden.shape
        h = hidden.reshape(r * W, H).index_select(0, positions)  # [M, H]
        logp, out["entropy"] = token_logprobs(
            h, head.weight, targets, bias=getattr(head, "bias", None), temperature=temperature,
            with_entropy=with_entropy, impl=impl, chunk_tokens=chunk_tokens,
        )
        return logp  # [M] in place of the [r, W, V] logits

    head.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield out
    finally:
        del head.forward


# -- layouts: which tokens go where ---------------------------------------------------------------
@dataclass
class Layout:
    """One model input for a set of sequences and where their completion log-probs land.

    input_ids, position_ids: [r, W]; attention_mask: [r, W] or None (packed rows).
    positions: [M] flat indices into r*W of the hidden states that predict a completion token.
    targets: [M] those tokens. dest_row, dest_col: [M] where each log-prob goes in the [n, C] output.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor | None
    positions: Tensor
    targets: Tensor
    dest_row: Tensor
    dest_col: Tensor
    n: int
    C: int
    real_tokens: int  # prompt + completion tokens of the sequences, without padding

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> Layout:
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.to(device) for k, v in tensors.items() if isinstance(v, Tensor)})

    def scatter(self, values: Tensor) -> Tensor:
        """[M] -> [n, C], zero where nothing was computed."""
        out = values.new_zeros(self.n, self.C)
        out[self.dest_row, self.dest_col] = values
        return out


class LayoutCache:
    """One step's layouts: every micro-batch's `Layout` and its rows as a device index, built at once
    from one host copy of the rollout, then reused by the reference, old-policy and update passes.
    Built per micro-batch instead, each one's device-to-host reads and pageable host-to-device copies
    synchronise the stream between micro-batches, and the GPU idles while the host lays out the next.
    `build(rollout, rows)` makes one layout; an empty micro-batch is laid out as row 0 (a dummy)."""

    def __init__(self, rollout, micro: list[list[int]], build):
        names = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        host = dataclasses.replace(rollout, **{k: getattr(rollout, k).cpu() for k in names})
        device = rollout.completion_ids.device
        self.rollout = rollout
        self.entries: dict[tuple[int, ...], tuple[Layout, Tensor]] = {}
        for rows in micro:
            rows = rows or [0]
            if tuple(rows) not in self.entries:
                self.entries[tuple(rows)] = (build(host, rows).to(device), torch.tensor(rows).to(device))

    def get(self, rollout, rows) -> tuple[Layout, Tensor] | None:
        """(layout, index) for `rows` of this very rollout, else None."""
        return self.entries.get(tuple(rows)) if rollout is self.rollout else None


def sequence_lengths(prompt_mask: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Real prompt and completion tokens per row ([N] each, on the CPU)."""
    return prompt_mask.sum(-1).cpu(), completion_mask.sum(-1).cpu()


def plan_micro_batches(lengths: list[int], token_budget: int, max_sequences: int | None = None) -> list[list[int]]:
    """Split sequence indices into micro-batches of at most `token_budget` tokens (padding included).

    Sequences are bucketed by length: sorted longest first and taken in that order, so each
    micro-batch holds sequences of similar length; within one, `pack_rows` lays them into rows as
    wide as its longest sequence. A sequence longer than the budget gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        trial = current + [i]
        too_many = max_sequences is not None and len(trial) > max_sequences
        if current and (too_many or _packed_size([lengths[j] for j in trial]) > token_budget):
            batches.append(current)
            trial = [i]
        current = trial
    if current:
        batches.append(current)
    return batches


# Share of the measured headroom a grown budget may fill: the per-token cost comes from the previous
# step's largest micro-batch, and the allocator needs slack for fragmentation.
GROW_MARGIN = 0.8


def grown_token_budget(default: int, headroom_bytes: float, bytes_per_token: float, margin: float = GROW_MARGIN) -> int:
    """The update's token budget when it may fill memory the rollout already used: `headroom_bytes` (the
    rollout's peak less what the update holds besides activations) over the measured `bytes_per_token`,
    times `margin`; never below `default`."""
    if bytes_per_token <= 0 or headroom_bytes <= 0:
        return default
    return max(default, int(margin * headroom_bytes / bytes_per_token))


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """First-fit decreasing into rows as wide as the longest sequence. Returns positions into `lengths`."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[k] <= free:
                rows[r].append(k)
                room[r] -= lengths[k]
                break
        else:
            rows.append([k])
            room.append(width - lengths[k])
    return rows


def _packed_size(lengths: list[int]) -> int:
    return len(pack_rows(lengths)) * max(lengths)


def pack_sequences(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                   rows: list[int], pad_token_id: int = 0) -> Layout:
    """Lay sequences `rows` end to end in rows of the longest one's width, no padding between them.

    Each sequence is its real prompt tokens then its completion up to and including EOS; position
    ids restart at 0 for each. A row's tail (if shorter) holds `pad_token_id` with positions that
    continue its last sequence, so it reads as that sequence's continuation (causal: never attended
    by a real token) rather than as a new sequence. The output [n, C] is ordered as `rows`.
    """
    rows = list(rows)
    dev = completion_ids.device
    # Built on the CPU (a few hundred small copies), moved to the device at once.
    prompt_ids, prompt_mask = prompt_ids[rows].cpu(), prompt_mask[rows].cpu()
    completion_ids, completion_mask = completion_ids[rows].cpu(), completion_mask[rows].cpu()
    p_len, c_len = sequence_lengths(prompt_mask, completion_mask)
    lengths = (p_len + c_len).tolist()
    if min(p_len.tolist(), default=1) < 1:
        raise ValueError("every sequence needs at least one prompt token to predict its first completion token")
    W = max(lengths)
    layout_rows = pack_rows(lengths)
    r = len(layout_rows)
    input_ids = torch.full((r, W), pad_token_id, dtype=completion_ids.dtype)
    position_ids = torch.zeros((r, W), dtype=torch.long)
    positions, targets, dest_row, dest_col = [], [], [], []
    for ri, members in enumerate(layout_rows):
        at = 0
        for k in members:
            p, c = int(p_len[k]), int(c_len[k])
            prompt = prompt_ids[k][prompt_mask[k].bool()]  # [p]
            completion = completion_ids[k, :c]  # [c]
            input_ids[ri, at : at + p] = prompt
            input_ids[ri, at + p : at + p + c] = completion
            position_ids[ri, at : at + p + c] = torch.arange(p + c)
            positions.append(ri * W + at + p - 1 + torch.arange(c))  # the states that predict each token
            targets.append(completion)
            dest_row.append(torch.full((c,), k, dtype=torch.long))
            dest_col.append(torch.arange(c))
            at += p + c
        if at < W:
            last = int(position_ids[ri, at - 1])
            position_ids[ri, at:] = torch.arange(last + 1, last + 1 + W - at)
    cat = lambda xs: (torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)).to(dev)  # noqa: E731
    return Layout(input_ids.to(dev), position_ids.to(dev), None, cat(positions), cat(targets), cat(dest_row),
                  cat(dest_col), n=len(rows), C=completion_ids.shape[1], real_tokens=sum(lengths))


def padded_layout(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                  rows) -> Layout:
    """Rows as sampled: left-padded prompt + right-padded completion, positions following the mask."""
    ids = torch.cat([prompt_ids[rows], completion_ids[rows]], dim=1)  # [n, P + C]
    mask = torch.cat([prompt_mask[rows], completion_mask[rows]], dim=1)  # [n, P + C]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    n, P, C = ids.shape[0], prompt_ids.shape[1], completion_ids.shape[1]
    on = completion_mask[rows].bool()  # [n, C]
    dest_row, dest_col = on.nonzero(as_tuple=True)
    positions = dest_row * (P + C) + P - 1 + dest_col
    return Layout(ids, position_ids, mask, positions, completion_ids[rows][on], dest_row, dest_col, n=n, C=C,
                  real_tokens=int(mask.sum()))
