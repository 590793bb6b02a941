"""Fused SwiGLU over transformers' concatenated gate/up output h = [gate | up] of shape [S, 2F].

a = silu(gate) * up in one pass (eager torch needs silu, mul, and in backward four more kernels
plus a cat). Math in fp32, one rounding to the storage dtype. Triton is imported lazily: it only
exists where MegaBlocks does (CUDA), or for the CPU interpreter in tests.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _r1l_swiglu_fwd(h_ptr, a_ptr, rows, F, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        mask = (r < rows) & (c < F)
        g_off = r * (2 * F) + c
        g = tl.load(h_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + g_off + F, mask=mask, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        tl.store(a_ptr + r * F + c, a.to(a_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _r1l_swiglu_bwd(h_ptr, da_ptr, dh_ptr, a_ptr, rows, F,
            WRITE_A: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        mask = (r < rows) & (c < F)
        g_off = r * (2 * F) + c
        a_off = r * F + c
        g = tl.load(h_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + g_off + F, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        # d/dg silu(g) = sig * (1 + g * (1 - sig))
        dg = da * u * sig * (1.0 + g * (1.0 - sig))
        du = da * silu
        tl.store(dh_ptr + g_off, dg.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + g_off + F, du.to(dh_ptr.dtype.element_ty), mask=mask)
        if WRITE_A:
            tl.store(a_ptr + a_off, (silu * u).to(a_ptr.dtype.element_ty), mask=mask)

    return triton, _r1l_swiglu_fwd, _r1l_swiglu_bwd


def _grid(triton, rows, F):
    block_c = min(512, triton.next_power_of_2(max(F, 1)))
    block_r = max(1, 2048 // block_c)  # ~2048 elements per program: enough to hide latency
    return (triton.cdiv(rows, block_r), triton.cdiv(F, block_c)), block_r, block_c


def swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    """[S, 2F] -> [S, F]."""
    h = h.contiguous()
    rows, F = h.shape[0], h.shape[1] // 2
    a = h.new_empty(rows, F)
    if rows == 0:
        return a
    triton, fwd, _ = _kernels()
    grid, br, bc = _grid(triton, rows, F)
    fwd[grid](h, a, rows, F, BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    return a


def swiglu_backward(h: torch.Tensor, da: torch.Tensor, want_a: bool = False):
    """-> (dh [S, 2F], a [S, F] rebuilt from h when want_a, else None)."""
    h, da = h.contiguous(), da.contiguous()
    rows, F = h.shape[0], h.shape[1] // 2
    dh = torch.empty_like(h)
    a = h.new_empty(rows, F) if want_a else None
    if rows == 0:
        return dh, a
    triton, _, bwd = _kernels()
    grid, br, bc = _grid(triton, rows, F)
    bwd[grid](h, da, dh, a if want_a else dh, rows, F, WRITE_A=want_a, BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    return dh, a
