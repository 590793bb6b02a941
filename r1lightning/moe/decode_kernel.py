"""Expert FFNs at decode in Triton: a small-M grouped GEMM that reads each expert's weights once.

At decode a step has T tokens (the live slots) and P = T·k (token, expert) pairs: at 128 slots, top-8 of
64 experts, ~16 pairs an expert. The step must stream every used expert's weights (12.9 GB a step on
the OLMoE shape, ~2.7 ms at the H200's copy rate); `torch._grouped_mm` tiles are built for thousands of
rows. Here each program takes one `block_m`-row block of one expert's pairs and one `BLOCK_N` slice of
its outputs, and walks the inner dimension. An expert whose pairs span two blocks has its weights read
twice, so `block_m` is sized to the load (`block_m_for`: 1.5× the mean pairs an expert, at least 16):

1. gate_up (`expert_gemm`, GATED): a = silu(x Wg^T) * (x Wu^T) for a block of pairs, both halves in
   one program, the SwiGLU in the epilogue in fp32 (one rounding; the unfused path rounds h, then a).
2. down (`expert_gemm`): y = (a Wd^T) * routing weight, stored per pair; a token's k pairs are summed after.

Shapes are static and nothing waits on the host (graph-safe): the pairs are sorted by expert on the
device, each expert's run padded to a multiple of `block_m` inside a buffer sized for the worst case
(`max_blocks`); a block past the last expert's run has expert -1 and its programs return at once. That
layout is one Triton program (`align_on_device`: a histogram, a scan, one atomic counter a pair) rather
than `align`'s ~15 small PyTorch kernels, which inside a captured step cost a few µs each, per layer.

`kernels` launches the three programs (on CUDA; the CPU tests run them under `TRITON_INTERPRET=1`);
`reference` is the same arithmetic in PyTorch, one expert at a time in fp32 (the CPU path, and the
tests' yardstick, as `align` is for the layout). `moe_decode`, one custom op, picks between them when it runs,
so `torch.compile` treats either as opaque and never traces Triton's import.
"""

from __future__ import annotations

import functools
import os

import torch

from r1lightning.moe.backend import triton_available

BLOCK_M = 16  # the smallest block: tl.dot's least inner size


def _tile(n: int, cap: int = 1 << 30) -> int:
    """A tile for n: the power of two >= n, at least BLOCK_M (tl.arange / tl.dot sizes), at most cap."""
    return max(BLOCK_M, min(cap, 1 << (max(n, 1) - 1).bit_length()))


def block_m_for(pairs: int, experts: int) -> int:
    """Rows a block: a power of two >= 1.5x the mean pairs an expert (16..128). At 128 slots, top-8 of 64,
    an expert gets Binomial(128, 1/8) pairs (16 ± 3.7): 32-row blocks hold nearly every expert's in one."""
    return _tile(-(-3 * pairs // (2 * experts)), 128)


def max_blocks(pairs: int, experts: int, block_m: int = BLOCK_M) -> int:
    """Blocks the padded layout can need: each expert's run rounded up to block_m adds < block_m rows."""
    return -(-(pairs + experts * (block_m - 1)) // block_m)


def align(expert_ids: torch.Tensor, experts: int, block_m: int = BLOCK_M):
    """expert_ids [P] -> (rows [NB·block_m] int32: the pair index at each padded position, P where
    padding; block_expert [NB] int32: each block's expert, -1 past the last run). In PyTorch, no host
    reads; `align_on_device` is the one-launch version the kernels use."""
    P = expert_ids.numel()
    dev = expert_ids.device
    nb = max_blocks(P, experts, block_m)
    e = expert_ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(experts, dtype=torch.int64, device=dev).scatter_add_(0, e, torch.ones_like(e))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(e, stable=True)
    sorted_e = e[order]
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = (padded_end - padded)[sorted_e] + rank
    rows = torch.full((nb * block_m,), P, dtype=torch.int32, device=dev)
    rows.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(nb, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, starts, right=True)
    block_expert = torch.where(block_expert < experts, block_expert, -1).to(torch.int32)
    return rows, block_expert


def _weight_view(w: torch.Tensor, transposed: bool):
    """(tensor, stride_e, stride_n, stride_k) reading w as W[e, n, k] with y = x @ W[e]^T."""
    if transposed:  # stored [E, k, n]
        return w, w.stride(0), w.stride(2), w.stride(1)
    return w, w.stride(0), w.stride(1), w.stride(2)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def align_kernel(IDS, ROWS, BLOCK_EXPERT, SCRATCH, P, E, NB,
                     BM: tl.constexpr, PB: tl.constexpr, EB: tl.constexpr, NBB: tl.constexpr, FILL: tl.constexpr):  # fmt: skip
        # `align` in one program (one launch instead of ~15 small ones per layer). A pair's place inside
        # its expert's run comes from an atomic counter, so the order within a run may differ from
        # `align`'s; each row of a block is computed on its own, so the results do not.
        i = tl.arange(0, PB)
        live = i < P
        ids = tl.load(IDS + i, mask=live, other=E).to(tl.int32)  # padding lanes count in the spare bin E
        e = tl.arange(0, EB)
        counts = tl.where(e < E, tl.histogram(ids, EB), 0)
        padded = (counts + BM - 1) // BM * BM
        padded_end = tl.cumsum(padded, 0)
        tl.store(SCRATCH + e, padded_end - padded)  # each run's first padded position
        tl.store(SCRATCH + EB + e, tl.zeros([EB], tl.int32))  # the runs' counters
        for r in range(0, NB * BM, FILL):
            f = r + tl.arange(0, FILL)
            tl.store(ROWS + f, tl.full([FILL], 0, tl.int32) + P, mask=f < NB * BM)
        b = tl.arange(0, NBB)
        before = tl.sum((padded_end[None, :] <= (b * BM)[:, None]).to(tl.int32), 1)  # searchsorted, right
        tl.store(BLOCK_EXPERT + b, tl.where(before < E, before, -1), mask=b < NB)
        tl.debug_barrier()
        rank = tl.atomic_add(SCRATCH + EB + ids, 1, mask=live)
        start = tl.load(SCRATCH + ids, mask=live, other=0)
        tl.store(ROWS + start + rank, i, mask=live)

    @triton.jit
    def expert_gemm(X, W, ROWS, BLOCK_EXPERT, ROUTE, OUT, P, ROW_DIV, KDIM, N,
                    stride_x, stride_we, stride_wn, stride_wk, stride_o, GATED: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
        # GATED (gate_up): OUT[pair] = silu(x Wg^T) * (x Wu^T), x the pair's token (ROW_DIV = top-k), Wu
        # N rows below Wg. Else (down): OUT[pair] = (a Wd^T) * route, a the pair's own row (ROW_DIV = 1).
        b = tl.program_id(0)
        e = tl.load(BLOCK_EXPERT + b)
        if e < 0:
            return
        pair = tl.load(ROWS + b * BM + tl.arange(0, BM))
        valid = pair < P
        safe = tl.where(valid, pair, 0).to(tl.int64)  # padding rows read pair 0's input, never stored
        row = safe // ROW_DIV
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < N
        kk = tl.arange(0, BK)
        w_base = W + e.to(tl.int64) * stride_we
        acc = tl.zeros([BM, BN], tl.float32)
        acc_u = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, KDIM, BK):
            k = k0 + kk
            k_ok = k < KDIM
            x_ptr = X + row[:, None] * stride_x + k[None, :]
            w_ptr = w_base + n[None, :] * stride_wn + k[:, None] * stride_wk
            if EVEN:  # tiles divide the matrices: no masks, so the loads vectorise
                x = tl.load(x_ptr)
                w = tl.load(w_ptr)
            else:
                x = tl.load(x_ptr, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptr, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
            if GATED:
                if EVEN:
                    wu = tl.load(w_ptr + N * stride_wn)
                else:
                    wu = tl.load(w_ptr + N * stride_wn, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                if IEEE:
                    acc_u += tl.dot(x, wu, input_precision="ieee")
                else:
                    acc_u += tl.dot(x, wu)
        if GATED:
            out = acc * tl.sigmoid(acc) * acc_u
        else:
            out = acc * tl.load(ROUTE + safe, mask=valid, other=0.0).to(tl.float32)[:, None]
        tl.store(OUT + safe[:, None] * stride_o + n[None, :], out.to(OUT.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])

    return align_kernel, expert_gemm


def align_on_device(expert_ids: torch.Tensor, experts: int, block_m: int = BLOCK_M):
    """`align` as one Triton program (P up to a few thousand pairs at decode): the same blocks, each
    with the same pairs, in an order within a block that may differ."""
    P = expert_ids.numel()
    nb = max_blocks(P, experts, block_m)
    dev = expert_ids.device
    rows = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    eb = 1 << experts.bit_length()  # a power of two > experts: bin `experts` takes the padding lanes
    scratch = torch.empty(2 * eb, dtype=torch.int32, device=dev)
    _kernels()[0][(1,)](expert_ids.reshape(-1), rows, block_expert, scratch, P, experts, nb,
                        BM=block_m, PB=_tile(P), EB=eb, NBB=_tile(nb), FILL=1024)  # fmt: skip
    return rows, block_expert


def supports(hidden: int, ffn: int) -> bool:
    """tl.dot needs inner sizes >= 16; the blocks below are clipped to the dimensions."""
    return hidden >= 16 and ffn >= 16


# Tile sizes and launch settings (BLOCK_N, BLOCK_K, warps, pipeline stages), timed on one H200 with
# `scripts/bench_moe.py --decode-tokens` (docs/benchmarks.md, sessions 12 and 14): fastest or within 2 %
# at 64, 128 and 256 slots among eight alternatives; narrower K tiles, counted to keep more weight bytes in
# flight at 256 slots, ran 17-60 % slower.
CONFIG = (64, 128, 4, 3)


def kernels(x, w_in, w_out, transposed, expert_ids, route, block_n: int | None = None, block_k: int | None = None,
            num_warps: int | None = None, num_stages: int | None = None, block_m: int | None = None):
    """x [T, H]; w_in gate|up [E, 2F, H] ([E, H, 2F] if transposed); w_out [E, H, F] ([E, F, H]);
    expert_ids [T, K]; route [T, K] -> [T, H] in x's dtype. Unset tile/launch settings come from CONFIG
    and `block_m_for`."""
    block_n, block_k, num_warps, num_stages = (v if v is not None else d for v, d in
                                               zip((block_n, block_k, num_warps, num_stages), CONFIG))
    launch = dict(num_warps=num_warps, num_stages=num_stages)
    T, K = expert_ids.shape
    H = x.shape[-1]
    E = w_in.shape[0]
    F = w_out.shape[-1] if not transposed else w_out.shape[1]
    P = T * K
    bm = block_m or block_m_for(P, E)
    rows, block_expert = align_on_device(expert_ids, E, bm)
    nb = block_expert.numel()
    gemm = _kernels()[1]
    ieee = x.dtype == torch.float32
    x = x.contiguous()
    a = torch.empty(P, F, dtype=x.dtype, device=x.device)
    w, se, sn, sk = _weight_view(w_in, transposed)
    bn, bk = _tile(F, block_n), _tile(H, block_k)
    gemm[(nb, -(-F // bn))](x, w, rows, block_expert, None, a, P, K, H, F, x.stride(0), se, sn, sk, a.stride(0), GATED=True,
                            BM=bm, BN=bn, BK=bk, IEEE=ieee, EVEN=F % bn == 0 and H % bk == 0, **launch)  # fmt: skip
    y = torch.empty(P, H, dtype=x.dtype, device=x.device)
    w, se, sn, sk = _weight_view(w_out, transposed)
    bn, bk = _tile(H, block_n), _tile(F, block_k)
    gemm[(nb, -(-H // bn))](a, w, rows, block_expert, route.reshape(-1).contiguous(), y, P, 1, F, H, a.stride(0), se, sn, sk,
                            y.stride(0), GATED=False, BM=bm, BN=bn, BK=bk, IEEE=ieee, EVEN=H % bn == 0 and F % bk == 0,
                            **launch)  # fmt: skip
    return y.view(T, K, H).sum(dim=1)


def reference(x, w_in, w_out, transposed, expert_ids, route):
    """The kernels' arithmetic in PyTorch, one expert at a time: fp32 GEMMs, SwiGLU in fp32, one rounding
    of a, the routing weight on the fp32 down output, one rounding of y, then the sum over k."""
    T, K = expert_ids.shape
    e = expert_ids.reshape(-1)
    xs = x.repeat_interleave(K, dim=0)  # [P, H]: each pair's token
    y = torch.empty(T * K, x.shape[-1], dtype=x.dtype, device=x.device)
    for expert in torch.unique(e).tolist():
        pairs = (e == expert).nonzero().squeeze(1)
        w1 = w_in[expert] if transposed else w_in[expert].t()  # [H, 2F]
        g, u = (xs[pairs].float() @ w1.float()).chunk(2, dim=-1)
        a = (torch.nn.functional.silu(g) * u).to(x.dtype)
        w2 = w_out[expert] if transposed else w_out[expert].t()  # [F, H]
        y[pairs] = ((a.float() @ w2.float()) * route.reshape(-1, 1)[pairs].float()).to(x.dtype)
    return y.view(T, K, -1).sum(dim=1)


def use_kernel(x: torch.Tensor) -> bool:
    """The Triton kernels on CUDA where Triton imports, and on the CPU under the Triton interpreter."""
    return triton_available() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


@torch.library.custom_op("r1lightning::moe_decode", mutates_args=())
def moe_decode(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, expert_ids: torch.Tensor, route: torch.Tensor,
               transposed: bool) -> torch.Tensor:
    """`kernels` or `reference` as one opaque op: `torch.compile` fuses around it, and the choice
    (which imports Triton) is made when it runs, not traced."""
    run = kernels if use_kernel(x) else reference
    return run(x, w_in, w_out, transposed, expert_ids, route)


@moe_decode.register_fake
def _moe_decode_fake(x, w_in, w_out, expert_ids, route, transposed):
    return x.new_empty(x.shape)
