"""Decode attention over the paged KV pool: the PyTorch reference against SDPA on each slot's own
contiguous sequence, and the Triton kernel against the reference (Triton's CPU interpreter where
Triton is installed; `tests/test_rollout_gpu.py` runs it on the GPU in bf16)."""

import pytest
import torch
import torch.nn.functional as F

from r1lightning.rollout import paged_attention as pa
from tests.triton_cpu import needs_triton, run_interpreted


def pooled_case(S=5, Hq=4, Hkv=2, d=32, bs=4, blocks=40, lengths=(1, 4, 5, 10, 7), dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator(device).manual_seed(seed)
    q = torch.randn(S, Hq, d, generator=g, device=device).to(dtype)
    k = torch.randn(blocks * bs, Hkv, d, generator=g, device=device).to(dtype)
    v = torch.randn(blocks * bs, Hkv, d, generator=g, device=device).to(dtype)
    # each slot owns distinct blocks in a random order; the rest of the pool is other slots' data
    perm = torch.randperm(blocks, generator=g, device=device)
    width = -(-max(lengths) // bs) + 1
    table = perm[: S * width].view(S, width)
    return q, k, v, table, torch.tensor(lengths, device=device), bs


def test_reference_equals_sdpa_over_each_slots_own_tokens():
    q, k, v, table, lengths, bs = pooled_case()
    S, Hq, d = q.shape
    got = pa.reference(q, k, v, table, lengths, bs, d**-0.5)
    for s in range(S):
        n = int(lengths[s])
        rows = (table[s, :, None] * bs + torch.arange(bs)).flatten()[:n]
        ks = k[rows].repeat_interleave(Hq // k.shape[1], dim=1).transpose(0, 1)  # [Hq, n, d]
        vs = v[rows].repeat_interleave(Hq // k.shape[1], dim=1).transpose(0, 1)
        want = F.scaled_dot_product_attention(q[s][:, None], ks, vs)[:, 0]
        torch.testing.assert_close(got[s], want, atol=1e-6, rtol=1e-6)


def test_reference_ignores_everything_past_a_slots_length():
    q, k, v, table, lengths, bs = pooled_case()
    before = pa.reference(q, k, v, table, lengths, bs, 0.1)
    k2, v2 = k.clone(), v.clone()
    for s, n in enumerate(lengths.tolist()):  # garbage in every pool row a slot must not read
        rows = (table[s, :, None] * bs + torch.arange(bs)).flatten()[n:]
        k2[rows], v2[rows] = 1e4, -1e4
    assert torch.equal(pa.reference(q, k2, v2, table, lengths, bs, 0.1), before)


def test_kernel_support_rules():
    assert pa.kernel_supports(128, 1) and pa.kernel_supports(32, 2) and pa.kernel_supports(64, 16)
    assert not pa.kernel_supports(96, 1) and not pa.kernel_supports(8, 1) and not pa.kernel_supports(64, 32)
    assert pa.kernel_supports(128, 1, 16) and not pa.kernel_supports(128, 1, 4) and not pa.kernel_supports(128, 1, 48)


INTERPRETED = """
import torch
from r1lightning.rollout import paged_attention as pa
import tests.test_paged_attention as t
worst = 0.0
for kw in [dict(bs=16, lengths=(1, 16, 17, 40, 3)), dict(Hq=8, Hkv=1, d=64, bs=16, lengths=(1, 16, 17, 40, 3)), dict(Hq=4, Hkv=4, d=32, bs=16, lengths=(1, 16, 17, 40, 3), dtype=torch.float16)]:
    q, k, v, table, lengths, bs = t.pooled_case(**kw)
    got = pa.kernel(q, k, v, table, lengths, bs, q.shape[-1] ** -0.5).float()
    want = pa.reference(q, k, v, table, lengths, bs, q.shape[-1] ** -0.5).float()
    tol = 1e-5 if q.dtype == torch.float32 else 2e-3
    err = (got - want).abs().max().item()
    assert err < tol, (kw, err)
# an fp8 pool (`kv_dtype: fp8`): the kernel widens it to the query's dtype; the reference reads it in fp32
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    q, k, v, table, lengths, bs = t.pooled_case(bs=16, lengths=(1, 16, 17, 40, 3), dtype=dtype)
    k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    got = pa.kernel(q, k, v, table, lengths, bs, q.shape[-1] ** -0.5).float()
    want = pa.reference(q, k, v, table, lengths, bs, q.shape[-1] ** -0.5).float()
    err = (got - want).abs().max().item()
    assert err < tol, ("fp8", dtype, err)
print("ok")
"""


@needs_triton
def test_kernel_equals_reference_under_the_triton_interpreter():
    run_interpreted(INTERPRETED)


# the kernel's runtime arguments as its launcher types them over a bf16 pool, and those it sees as multiples of 16
KERNEL_TYPES = dict(Q="*bf16", K="*bf16", V="*bf16", TABLE="*i64", LENS="*i32", O="*bf16", scale="fp32",
                    **{name: "i32" for name in ("stride_qs", "stride_qh", "stride_kr", "stride_kh", "stride_vr", "stride_vh",
                                                "stride_ts", "stride_os", "stride_oh")})
KERNEL_ALIGNED = [name for name in KERNEL_TYPES if name != "scale"]


@needs_triton
def test_kernel_compiles_for_hopper():
    # ahead of time for sm_90 (tests/triton_cpu.py): the OLMoE shape (16 heads, no grouping) and a GQA group of 8
    from tests.triton_cpu import compile_for_hopper

    types, aligned = KERNEL_TYPES, KERNEL_ALIGNED
    for group in (1, 8):
        k = compile_for_hopper(pa._kernel(), types, dict(GROUP=group, GPAD=16, D=128, BS=64, IEEE=False), aligned)
        assert "async_copy" in k.asm["ttgir"], group  # the blocks' K and V stream through shared memory
    # an fp8 pool (`kv_dtype: fp8`): e4m3 loads, widened to bf16 in registers
    k = compile_for_hopper(pa._kernel(), dict(types, K="*fp8e4nv", V="*fp8e4nv"),
                           dict(GROUP=1, GPAD=16, D=128, BS=64, IEEE=False), aligned)
    assert "async_copy" in k.asm["ttgir"] and "f8E4M3FN" in k.asm["ttgir"]


@needs_triton
def test_each_launch_fits_an_sm_on_the_sm90_build():
    """`launch_config`'s launches, compiled for sm_90: an SM holds at least one program (registers and
    shared memory), from the smallest tiles to the largest, bf16 and fp8. The 5-stage fp8 launch (measured
    faster on the H200, session 14) is the one a tile of 64 x 128 gets; 5 stages would not fit a bf16 tile
    of 128 x 256 (268 KiB of shared memory on Triton 3.9), which is why larger tiles keep 3."""
    from tests.triton_cpu import compile_for_hopper, registers_per_thread

    fp8_types = dict(KERNEL_TYPES, K="*fp8e4nv", V="*fp8e4nv")
    assert pa.launch_config(1, 64, 128) == (4, 5) and pa.launch_config(2, 64, 128) == (4, 3) and pa.launch_config(1, 128, 256) == (4, 3)

    def resident(types, block, head_dim, warps, stages):
        k = compile_for_hopper(pa._kernel(), types, dict(GROUP=1, GPAD=16, D=head_dim, BS=block, IEEE=False), KERNEL_ALIGNED,
                               warps, stages)
        return min(65536 // (registers_per_thread(k) * 32 * warps), 232448 // k.metadata.shared)

    for types, size in ((KERNEL_TYPES, 2), (fp8_types, 1)):
        for block, head_dim in ((64, 128), (128, 256)):
            assert resident(types, block, head_dim, *pa.launch_config(size, block, head_dim)) >= 1, (size, block, head_dim)
    assert resident(KERNEL_TYPES, 128, 256, 4, 5) == 0


def test_bench_paged_attention_counts_half_the_bytes_for_an_fp8_pool():
    """`scripts/bench_paged_attention.py` on the CPU (the reference path): an fp8 pool reads half the
    bf16 pool's bytes, and its output is further from the fp32 reference than bf16's (e4m3 keeps 3
    mantissa bits, bf16 7), within a few percent."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_paged_attention.py")
    spec = importlib.util.spec_from_file_location("bench_paged_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--device", "cpu", "--slots", "3", "--length", "40", "--layers", "2", "--heads", "2",
                      "--head-dim", "32", "--block-size", "16", "--iters", "2", "--warmup", "0"])
    bf16, fp8 = out["rows"]
    assert (bf16["pool"], fp8["pool"]) == ("bf16", "fp8") and bf16["path"] == "reference" and bf16["launch"] == "-"
    assert bench.parse_launch("auto") is None and bench.parse_launch("8x5") == (8, 5)
    with pytest.raises(SystemExit, match="--launch '5': expected auto or WARPSxSTAGES"):
        bench.parse_launch("5")
    assert bf16["gb_read"] == 2 * fp8["gb_read"] == 2 * 2 * 3 * 40 * 2 * 32 * 2 / 1e9  # K+V, layers, slots, tokens, heads, dim, bytes
    assert bf16["rel_err_vs_fp32"] < 1e-2 < fp8["rel_err_vs_fp32"] < 6e-2
