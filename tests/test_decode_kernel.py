"""The Triton decode-experts kernels (`moe/decode_kernel.py`): the padded layout, the PyTorch reference
against a per-token loop, the kernels (the one-program layout too) against the reference under the
Triton interpreter, their sm_90 build, and the `triton` mode through the paged engine."""

from __future__ import annotations

import pytest
import torch

from r1lightning.moe import decode_kernel as dk
from tests.triton_cpu import needs_triton, run_interpreted


def per_token(x, w_in, w_out, ids, route):
    """The experts' definition, one (token, expert) pair at a time, in fp64: y_t = sum_j r_tj * Wd_e (silu(Wg_e x) * Wu_e x)."""
    F = w_out.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            h = w_in[e].double() @ x[t].double()
            a = torch.nn.functional.silu(h[:F]) * h[F:]
            out[t] += route[t, j].double() * (w_out[e].double() @ a)
    return out


def case(T, E=8, K=2, H=48, F=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w_in = (torch.randn(E, 2 * F, H, generator=g) / H**0.5).to(dtype)
    w_out = (torch.randn(E, H, F, generator=g) / F**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    route = torch.rand(T, K, generator=g).softmax(-1)
    return x, w_in, w_out, ids, route


def same_layout(a, b, block_m) -> bool:
    """Two (rows, block_expert) layouts with the same blocks holding the same pairs (order within a block free)."""
    (rows_a, exp_a), (rows_b, exp_b) = a, b
    blocks = lambda rows: rows.view(-1, block_m).sort(dim=1).values  # noqa: E731
    return torch.equal(exp_a.cpu(), exp_b.cpu()) and torch.equal(blocks(rows_a.cpu()), blocks(rows_b.cpu()))


@pytest.mark.parametrize("P,E,block", [(1, 4, 16), (37, 8, 16), (64, 64, 16), (200, 8, 32), (0, 4, 16)])
def test_align_pads_each_expert_run_to_whole_blocks(P, E, block):
    ids = torch.randint(0, E, (P,), generator=torch.Generator().manual_seed(P))
    ids[: min(P, 3)] = E - 1  # one expert with several pairs, others possibly empty
    rows, block_expert = dk.align(ids, E, block)
    nb = dk.max_blocks(P, E, block)
    assert rows.shape == (nb * block,) and block_expert.shape == (nb,)
    real = rows[rows < P]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    for b, e in enumerate(block_expert.tolist()):
        chunk = rows[b * block:(b + 1) * block]
        members = chunk[chunk < P]
        if e < 0:
            assert members.numel() == 0  # past the last run: nothing to compute
        else:
            assert members.numel() > 0 and (ids[members.long()] == e).all()  # a block holds one expert's pairs
    used = int((block_expert >= 0).sum())
    want = sum(-(-int((ids == e).sum()) // block) for e in range(E))
    assert used == want  # exactly the blocks the counts need, in expert order
    assert block_expert[:used].tolist() == sorted(block_expert[:used].tolist())


def test_block_m_follows_the_load():
    # 1.5x the mean pairs an expert, a power of two in 16..128
    assert [dk.block_m_for(T * 8, 64) for T in (1, 16, 64, 128, 256, 1024, 4096)] == [16, 16, 16, 32, 64, 128, 128]


@pytest.mark.parametrize("T", [1, 5, 33])
def test_reference_equals_the_per_token_definition(T):
    x, w_in, w_out, ids, route = case(T)
    got = dk.reference(x, w_in, w_out, False, ids, route).double()
    want = per_token(x, w_in, w_out, ids, route)
    assert (got - want).abs().max().item() < 1e-5
    # stored transposed ([E, in, out]) gives the same result
    got_t = dk.reference(x, w_in.transpose(1, 2).contiguous(), w_out.transpose(1, 2).contiguous(), True, ids, route)
    assert (got_t.double() - want).abs().max().item() < 1e-5


# Half precision as float16: the interpreter computes in NumPy, which has no bfloat16 (bf16 is checked on
# the GPU, tests/test_moe_gpu.py).
INTERPRETED = r"""
import torch
from r1lightning.moe import decode_kernel as dk
from tests.test_decode_kernel import case, per_token, same_layout
for P, E, bm in [(1, 4, 16), (37, 8, 16), (64, 64, 16), (200, 8, 32), (2048, 64, 64)]:
    ids = torch.randint(0, E, (P,), generator=torch.Generator().manual_seed(P))
    assert same_layout(dk.align(ids, E, bm), dk.align_on_device(ids, E, bm), bm), (P, E, bm)
for T, E, K, H, F, dtype in [(1, 4, 2, 32, 16, torch.float32), (7, 8, 2, 48, 40, torch.float32),
                             (40, 8, 3, 64, 24, torch.float32), (20, 8, 2, 64, 48, torch.float16)]:
    x, w_in, w_out, ids, route = case(T, E, K, H, F, dtype)
    want = dk.reference(x, w_in, w_out, False, ids, route).float()
    got = dk.kernels(x, w_in, w_out, False, ids, route, block_n=16, block_k=16, block_m=16).float()
    got_t = dk.kernels(x, w_in.transpose(1, 2).contiguous(), w_out.transpose(1, 2).contiguous(), True, ids, route,
                       block_n=32, block_k=32).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for g in (got, got_t):
        err = (g - want).abs().max().item()
        assert err < tol, (T, E, K, H, F, dtype, err)
    if dtype == torch.float32:
        assert (got.double() - per_token(x, w_in, w_out, ids, route)).abs().max().item() < 1e-5
print("ok")
"""


@needs_triton
def test_kernels_equal_reference_under_the_triton_interpreter():
    run_interpreted(INTERPRETED)


def test_paged_engine_with_triton_experts_matches_generate(tiny_moe_config):
    # on the CPU `triton` runs the reference through the same custom op: greedy tokens and log-probs of `generate`
    from r1lightning.rollout import HFGenerateSampler, SamplingParams
    from r1lightning.rollout.paged import PagedSampler
    from tests.test_rollout_engine import RAGGED, build, encode, pick_mid_batch_eos

    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, RAGGED)
    eos = pick_mid_batch_eos(model, tok, ids, mask, 12)
    params = SamplingParams(12, temperature=0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    ours = PagedSampler(max_slots=3, block_size=4, decode_experts="triton").generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert ref.truncated.any() and (~ref.truncated).any()
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=2e-5, rtol=0)


def test_triton_mode_refuses_experts_it_cannot_compute(tiny_moe_config):
    from r1lightning.moe import decode_experts, experts_modules
    from tests.test_rollout_engine import build

    model, _ = build(tiny_moe_config)
    _, experts = next(experts_modules(model))
    experts._r1l_decode_mode = "triton"
    experts.has_bias = True
    x, idx, w = torch.randn(2, experts.gate_up_proj.shape[-1]), torch.tensor([[0, 1], [1, 2]]), torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="triton cannot run .*biases"):
        decode_experts.decode_experts_forward(experts, x, idx, w)
    # and the engine says so before its first step, naming the module
    with pytest.raises(ValueError, match=r"triton cannot run model\.layers\.0\.mlp\.experts .*biases"):
        decode_experts.set_decode_mode(model, "triton")


GEMM_TYPES = dict(X="*bf16", W="*bf16", ROWS="*i32", BLOCK_EXPERT="*i32", ROUTE="*bf16", OUT="*bf16", P="i32", ROW_DIV="i32",
                  KDIM="i32", N="i32", stride_x="i32", stride_we="i32", stride_wn="i32", stride_wk="i32", stride_o="i32")
# what the launcher sees as multiples of 16 at the OLMoE shape (pointers, sizes, strides)
GEMM_ALIGNED = ("X", "W", "ROWS", "BLOCK_EXPERT", "ROUTE", "OUT", "KDIM", "N", "stride_x", "stride_we", "stride_wn", "stride_o")


@needs_triton
def test_kernels_compile_for_hopper():
    # ahead of time for sm_90 with Triton's own ptxas: what the GPU would build, checked on the CPU
    from tests.triton_cpu import compile_for_hopper

    align_kernel, gemm = dk._kernels()
    layout_types = dict(IDS="*i64", ROWS="*i32", BLOCK_EXPERT="*i32", SCRATCH="*i32", P="i32", E="i32", NB="i32")
    for bm, pb in ((16, 128), (32, 1024), (64, 2048)):
        assert compile_for_hopper(align_kernel, layout_types, dict(BM=bm, PB=pb, EB=128, NBB=128, FILL=1024)).asm["cubin"]
    for gated in (True, False):
        for bm, bn, bk, warps, stages in ((16, 64, 128, 4, 3), (32, 64, 128, 4, 3), (64, 64, 64, 4, 4)):
            consts = dict(GATED=gated, BM=bm, BN=bn, BK=bk, IEEE=False, EVEN=True, stride_wk=1)
            if gated:
                consts["ROUTE"] = None  # gate_up has no routing weights
            aligned = [a for a in GEMM_ALIGNED if a not in consts]
            k = compile_for_hopper(gemm, GEMM_TYPES, consts, aligned, warps, stages)
            # the weights stream through shared memory by asynchronous copies, several tiles in flight
            assert "async_copy" in k.asm["ttgir"] and k.metadata.shared >= 2 * bk * bn * 2, (consts, k.metadata.shared)
    # tiles that do not divide the matrices (masked loads), and fp32 with IEEE dots
    assert compile_for_hopper(gemm, GEMM_TYPES, dict(ROUTE=None, GATED=True, BM=16, BN=32, BK=32, IEEE=False, EVEN=False)).asm["cubin"]
    fp32 = {name: "*fp32" if t == "*bf16" else t for name, t in GEMM_TYPES.items()}
    assert compile_for_hopper(gemm, fp32, dict(GATED=False, BM=16, BN=32, BK=32, IEEE=True, EVEN=True)).asm["cubin"]
