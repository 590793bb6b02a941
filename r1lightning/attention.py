"""Packed-row attention that computes only inside each sequence (`attn_implementation: r1l_varlen`).

The update and the reference pass lay the sequences of a micro-batch end to end in rows of up to
`micro_batch_tokens` tokens (`r1lightning.logprobs.pack_sequences`). Under `sdpa` transformers keeps
attention inside each sequence with a block-diagonal [W, W] mask, and a masked SDPA call runs the
memory-efficient kernel over the whole W x W square: a row of 8,192 tokens holding 23 sequences of
~350 tokens does 8,192² score entries where its sequences need 23 x 350² / 2 (1/48 of it). On the
OLMoE-1B-7B shape that square is 4 x W x d x layers = 1.1 GFLOP per token forward, about 40 % of
the token's other work. Flash attention's variable-length form takes the sequence boundaries
(`cu_seqlens`) instead and skips everything outside the causal triangle of each sequence.

`attention_forward` is what transformers calls for `r1l_varlen`:
- with `cu_seq_lens_q` (the packed layouts pass it, see `Layout.cu_seqlens`): flash varlen through
  `torch.ops.aten._flash_attention_forward` on CUDA in bf16/fp16 (autograd through PyTorch's own
  backward); elsewhere the mask transformers built from the restarting position ids and SDPA, exactly
  as `sdpa` would run;
- without it (padded rows, generation): SDPA with transformers' own mask, as `sdpa`.

`reference_varlen` is the same contract in plain PyTorch (causal SDPA per sequence); CPU tests hold it
equal to the masked SDPA path, GPU tests hold the flash path equal to both.
"""

from __future__ import annotations

import torch
from torch import Tensor

ATTN_IMPLEMENTATION = "r1l_varlen"


def flash_supported(query: Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, cu_seq_lens_q: Tensor | None = None,
                      max_length_q: int | None = None, **kwargs):
    """query [b, Hq, s, d], key/value [b, Hkv, s, d] -> ([b, s, Hq, d], None), as transformers' SDPA."""
    if cu_seq_lens_q is None or not flash_supported(query):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs.pop("cu_seq_lens_k", None), kwargs.pop("max_length_k", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, _, s, _ = query.shape
    out = varlen_flash(_flat(query), _flat(key), _flat(value), cu_seq_lens_q, int(max_length_q), scaling,
                       dropout if module.training else 0.0)
    return out.view(b, s, *out.shape[1:]), None


def _flat(x: Tensor) -> Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)  # [tokens, heads, d], rows end to end as cu_seqlens counts


def varlen_flash(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float | None,
                 dropout: float = 0.0) -> Tensor:
    """Causal attention within each [cu[i], cu[i+1]) span; q [T, Hq, d], k/v [T, Hkv, d] -> [T, Hq, d]."""
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout,
                                                  True, False, scale=scale)[0]
    return out


def reference_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None) -> Tensor:
    """`varlen_flash` in plain PyTorch: causal SDPA over each sequence on its own."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, e in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (x[a:e].transpose(0, 1) for x in (q, k, v))  # [H, n, d]
        ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        out[a:e] = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1)
    return out


def register() -> None:
    """Make `r1l_varlen` a name transformers accepts (idempotent); its masks are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
