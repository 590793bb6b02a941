"""Decode attention read straight from the paged KV pool: a Triton kernel, and its PyTorch reference.

Without it, every decode step of `PagedSampler` gathers each slot's first `kv_len` pool rows into a
dense [slots, heads, kv_len, head_dim] copy and runs SDPA on the copy. Per layer and step that moves
the KV three times (pool read, copy write, copy read), and `kv_len` is the bucket over the longest
live sequence, so short sequences pay for the longest. The kernel walks each slot's block table up
to that slot's own length and reads each block once: one program per (slot, KV head), the heads of a
GQA group together, online softmax over blocks of `block_size` tokens (fp32 accumulation).

`kernel` runs on CUDA when Triton imports (`moe.backend.triton_available`) and the shapes suit it
(`kernel_supports`); `reference` (gather + masked softmax in fp32) runs elsewhere, and the CPU tests
compare the kernel with it (under `TRITON_INTERPRET=1` where Triton is installed, and on the GPU).
`PagedSampler` decides which of the two a call uses and tells the cache (`PagedKV.attention`); both run
as one custom op (`paged_decode`), opaque to `torch.compile`.

transformers calls attention through its `AttentionInterface`; `register()` adds
`ATTN_IMPLEMENTATION`, which is SDPA unless the forward carries `paged_kv=<PagedKV in kernel mode>`
(the paged engine's decode step passes it), and then this kernel over the pool.
"""

from __future__ import annotations

import functools
import math

import torch

ATTN_IMPLEMENTATION = "r1_paged_decode"


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def kernel_supports(head_dim: int, group: int, block_size: int = 64) -> bool:
    """Shapes the kernel takes: power-of-two head_dim and block_size >= 16 (tl.dot's inner sizes,
    tl.arange) and up to 16 query heads per KV head (the padded row count of its dot)."""
    return _pow2(head_dim) and _pow2(block_size) and 1 <= group <= 16


def reference(q, k_pool, v_pool, block_table, lengths, block_size: int, scale: float):
    """q [S, Hq, d]; pools [rows, Hkv, d] (q's dtype, or fp8); block_table [S, >= ceil(max len / block_size)]
    pool block ids; lengths [S] tokens each slot attends to (its first `lengths[s]` positions) -> [S, Hq, d]
    in q's dtype."""
    S, Hq, d = q.shape
    Hkv = k_pool.shape[1]
    T = max(int(lengths.max()), 1)
    nb = -(-T // block_size)
    offsets = torch.arange(block_size, device=q.device)
    rows = (block_table[:, :nb, None] * block_size + offsets).view(S, nb * block_size)[:, :T]
    k = k_pool[rows].float().repeat_interleave(Hq // Hkv, dim=2)  # [S, T, Hq, d]
    v = v_pool[rows].float().repeat_interleave(Hq // Hkv, dim=2)
    scores = torch.einsum("shd,sthd->sht", q.float(), k) * scale
    outside = torch.arange(T, device=q.device)[None, None, :] >= lengths.view(S, 1, 1)
    p = scores.masked_fill(outside, -math.inf).softmax(-1)
    return torch.einsum("sht,sthd->shd", p, v).to(q.dtype)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(Q, K, V, TABLE, LENS, O, scale,
                     stride_qs, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_ts, stride_os, stride_oh,
                     GROUP: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        s = tl.program_id(0)
        h = tl.program_id(1)  # KV head; its GROUP query heads are rows of one dot
        n = tl.load(LENS + s)
        g = tl.arange(0, GPAD)
        d = tl.arange(0, D)
        j = tl.arange(0, BS)
        rows = g < GROUP
        heads = h * GROUP + g
        q = tl.load(Q + s * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=rows[:, None], other=0.0)
        m = tl.full([GPAD], float("-inf"), tl.float32)
        l = tl.zeros([GPAD], tl.float32)
        acc = tl.zeros([GPAD, D], tl.float32)
        for b in range(0, tl.cdiv(n, BS)):
            block = tl.load(TABLE + s * stride_ts + b).to(tl.int64)
            r = block * BS + j
            # an fp8 pool (`kv_dtype: fp8`) is widened to q's dtype in registers: the bytes read are halved
            k = tl.load(K + r[:, None] * stride_kr + h * stride_kh + d[None, :]).to(Q.dtype.element_ty)
            v = tl.load(V + r[:, None] * stride_vr + h * stride_vh + d[None, :]).to(Q.dtype.element_ty)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where((b * BS + j)[None, :] < n, qk * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / l[:, None]
        tl.store(O + s * stride_os + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty), mask=rows[:, None])

    return paged_decode


def launch_config(pool_element_size: int, block_size: int, head_dim: int) -> tuple[int, int]:
    """(num_warps, num_stages) of a launch, as measured on one H200 (16 layers, blocks of 64 x 128,
    docs/benchmarks.md session 14). fp8 pools of 64 x 128 tiles or smaller take 5 stages: 7.06 against
    7.40 ms at 128 slots x 2,176 tokens, faster at 512 and 8,192 too. bf16 keeps 3: 5 stages gained 2 %
    at 2,176 and lost 20 % at 32 slots x 8,192. An fp8 read stays at ~2.5 TB/s against bf16's 4.4: the
    shared-memory bytes in flight an SM (ptxas: 88 KiB at 3 stages, 190 at 5, bf16's 190) predicted
    ~4.2 ms at 5 stages, and measured 7.06, so they are not what bounds it. Larger fp8 tiles keep 3
    stages: untimed, and fewer programs fit an SM (5 stages would not fit a bf16 128 x 256 tile at all)."""
    if pool_element_size == 1 and block_size * head_dim <= 64 * 128:
        return 4, 5
    return 4, 3


def kernel(q, k_pool, v_pool, block_table, lengths, block_size: int, scale: float, num_warps: int | None = None,
           num_stages: int | None = None):
    """The Triton kernel; same arguments and result as `reference`. `lengths` must be >= 1 (an idle
    slot still attends to one position, so its row stays finite). `num_warps` / `num_stages`: the
    launch's (None: `launch_config`; `scripts/bench_paged_attention.py --launch` compares them)."""
    S, Hq, d = q.shape
    Hkv = k_pool.shape[1]
    group = Hq // Hkv
    if not kernel_supports(d, group, block_size) or Hq % Hkv:
        raise ValueError(f"paged attention kernel: head_dim {d}, block_size {block_size}, {Hq} query heads over {Hkv} KV heads not supported")
    if k_pool.stride(2) != 1 or v_pool.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("paged attention kernel: head_dim must be the innermost, contiguous dimension")
    warps, stages = launch_config(k_pool.element_size(), block_size, d)
    out = torch.empty_like(q)
    _kernel()[(S, Hkv)](
        q, k_pool, v_pool, block_table, lengths.to(torch.int32), out, float(scale),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GPAD=max(16, 1 << (group - 1).bit_length()), D=d, BS=block_size,
        IEEE=q.dtype == torch.float32, num_warps=num_warps or warps, num_stages=num_stages or stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("r1lightning::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                 lengths: torch.Tensor, block_size: int, scale: float, use_kernel: bool) -> torch.Tensor:
    """`kernel` or `reference` as one opaque op, so `torch.compile` fuses the rest of a decode step
    around it instead of tracing the kernel launch (or the reference's data-dependent length)."""
    attend = kernel if use_kernel else reference
    return attend(q, k_pool, v_pool, block_table, lengths, block_size, scale)


@paged_decode.register_fake
def _paged_decode_fake(q, k_pool, v_pool, block_table, lengths, block_size, scale, use_kernel):
    return torch.empty_like(q)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, paged_kv=None, **kwargs):
    """transformers' attention signature. With `paged_kv` (decode, reading the pool) `key`/`value` are
    the layer's pools and the slots' block tables and lengths come from `paged_kv`; otherwise SDPA."""
    if paged_kv is None or paged_kv.attention == "gather" or query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # a pool kept in another dtype is read in its own; an fp8 pool (storage only) in the query's
    q = query[:, :, 0] if key.dtype == torch.float8_e4m3fn else query[:, :, 0].to(key.dtype)
    out = paged_decode(q, key, value, paged_kv.table, paged_kv.lengths, paged_kv.block_size, float(scale),
                       paged_kv.attention == "kernel")
    return out.to(query.dtype)[:, None], None  # [S, 1, Hq, d], as sdpa_attention_forward returns


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
