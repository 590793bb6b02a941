"""The rollout engine on CUDA with graphs (`pytest -m gpu`; skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch

from r1lightning.moe import megablocks_status
from r1lightning.rollout import HFGenerateSampler, SamplingParams, StaticCacheSampler
from tests.test_rollout_engine import OLMOE, build, encode, pick_mid_batch_eos, training_logits, training_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def on_cuda(config, dtype=torch.float32, **kw):
    model, tok = build(config, **kw)
    return model.to("cuda", dtype), tok


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_graphs_greedy_matches_generate_fp32(arch, tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config if arch == "qwen3_moe" else OLMOE, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok))
    eos = pick_mid_batch_eos(model, tok, ids, mask, 16)
    params = SamplingParams(16, 0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    engine = StaticCacheSampler(kv_bucket=8, sync_every=2)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert engine.last_stats["graphs"] >= 2  # one per KV bucket
    w = ref.completion_ids.shape[1]
    assert ref.truncated.any() and (~ref.truncated).any()
    assert torch.equal(ours.completion_ids[:, :w], ref.completion_ids)
    assert torch.equal(ours.truncated, ref.truncated)
    torch.testing.assert_close(ours.logprobs[:, :w], ref.logprobs, atol=1e-4, rtol=0)


def test_graphs_bf16_grouped_mm_equal_eager_and_see_weight_updates(tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config, torch.bfloat16, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok))
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)  # bf16: the grouped_mm decode path
    params = SamplingParams(12, 0)
    graphs, eager = StaticCacheSampler(), StaticCacheSampler(cuda_graphs=False)
    a = graphs.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    b = eager.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=0, rtol=0)
    n_graphs = graphs.last_stats["graphs"]
    with torch.no_grad():  # an optimizer-style in-place update of expert weights and the embedding
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    c = graphs.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    d = eager.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert graphs.last_stats["graphs"] == n_graphs  # no recapture: the graphs read the live weights
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert torch.equal(c.completion_ids, d.completion_ids)


def test_graphs_seeded_sampling_and_logprobs(tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok))
    engine = StaticCacheSampler()
    params = SamplingParams(12, temperature=0.8, top_p=0.95, top_k=30, seed=5)
    a = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    b = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(a.completion_ids, b.completion_ids)
    with torch.no_grad():
        ref = training_logprobs(model, a, 0.8) * a.completion_mask
    torch.testing.assert_close(a.logprobs, ref, atol=1e-4, rtol=0)


@pytest.mark.skipif(not megablocks_status()[0], reason=f"megablocks: {megablocks_status()[1]}")
def test_megablocks_prefill_graph_decode(tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config, torch.bfloat16, moe_backend="megablocks")
    assert model.config._experts_implementation == "megablocks"
    ids, mask = (t.cuda() for t in encode(tok))
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    params = SamplingParams(10, 0)
    ours = StaticCacheSampler().generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert model.config._experts_implementation == "megablocks"  # restored after decode
    model.set_experts_implementation("grouped_mm")
    ref = StaticCacheSampler(cuda_graphs=False).generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    # bf16 prefill through different kernels: near-tied greedy choices may flip, most must agree
    assert (ours.completion_ids == ref.completion_ids).float().mean() > 0.8


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decode_greedy_matches_generate_fp32(mode, tiny_moe_config):
    torch._dynamo.reset()
    model, tok = on_cuda(tiny_moe_config, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok))
    eos = pick_mid_batch_eos(model, tok, ids, mask, 16)
    params = SamplingParams(16, 0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    engine = StaticCacheSampler(compile=mode)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    again = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    w = ref.completion_ids.shape[1]
    assert ref.truncated.any() and (~ref.truncated).any()
    assert torch.equal(ours.completion_ids[:, :w], ref.completion_ids)
    assert torch.equal(again.completion_ids, ours.completion_ids)
    torch.testing.assert_close(ours.logprobs[:, :w], ref.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decode_bf16_logprobs_as_close_to_fp32_as_eager(mode, tiny_moe_config):
    # Greedy bf16 rows diverge for good after one near-tied flip, so compare per token: each sampler's
    # log-probs of the tokens it sampled against a teacher-forced fp32 forward over them. Inductor
    # keeps fp32 between fused ops, so the compiled step is not bit-equal to eager bf16; it must be
    # no further from fp32 than eager is (a stale cache slot or position would cost nats).
    torch._dynamo.reset()
    model, tok = on_cuda(tiny_moe_config, moe_backend="grouped_mm")
    truth = copy.deepcopy(model)
    model = model.to(torch.bfloat16)
    ids, mask = (t.cuda() for t in encode(tok))
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    params = SamplingParams(12, 1.0, seed=0)

    def gap(sampler):
        out = sampler.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
        with torch.no_grad():
            ref = training_logprobs(truth, out, 1.0)
        return (out.logprobs - ref)[out.completion_mask.bool()].abs().mean().item()

    compiled, eager = gap(StaticCacheSampler(compile=mode)), gap(StaticCacheSampler())
    assert compiled < 1.5 * eager + 0.01, (compiled, eager)


# -- the paged engine (continuous batching, KV blocks) with CUDA graphs ------------------------------
from r1lightning.rollout import PagedSampler  # noqa: E402
from tests.test_rollout_engine import RAGGED  # noqa: E402


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_paged_graphs_greedy_matches_generate_fp32(arch, tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config if arch == "qwen3_moe" else OLMOE, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    eos = pick_mid_batch_eos(model, tok, ids, mask, 16)
    params = SamplingParams(16, 0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    engine = PagedSampler(max_slots=3, block_size=4, kv_bucket=8, sync_every=2)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert engine.last_stats["graphs"] >= 2 and engine.last_stats["admitted"] == len(RAGGED)
    assert engine.last_stats["compactions"] >= 1
    assert ref.truncated.any() and (~ref.truncated).any()
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(ours.truncated, ref.truncated)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-4, rtol=0)
    # released for the update, then captured again: same tokens
    engine.release_for_update()
    assert not engine._state
    again = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert torch.equal(again.completion_ids, ours.completion_ids)


def test_paged_attention_kernel_equals_reference_bf16_at_olmoe_shapes():
    from r1lightning.rollout import paged_attention as pa
    from tests.test_paged_attention import pooled_case

    for kw in [dict(S=64, Hq=16, Hkv=16, d=128, bs=64, blocks=4300, lengths=tuple(range(1, 4097, 64))),
               dict(S=8, Hq=32, Hkv=4, d=128, bs=16, blocks=512, lengths=(1, 15, 16, 17, 200, 333, 512, 7))]:  # fmt: skip
        q, k, v, table, lengths, bs = pooled_case(**kw, dtype=torch.bfloat16, device="cuda")
        got = pa.kernel(q, k, v, table, lengths, bs, 128**-0.5).float()
        want = pa.reference(q, k, v, table, lengths, bs, 128**-0.5).float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("E,K,H,F", [(64, 8, 2048, 1024), (8, 2, 768, 768)])  # OLMoE; configs/gpu/long_*'s Qwen3-MoE
def test_decode_experts_kernels_equal_reference_bf16_at_olmoe_shapes(E, K, H, F):
    from r1lightning.moe import decode_kernel as dk
    from tests.test_decode_kernel import case, same_layout

    for T in (1, 16, 128, 256):
        x, w_in, w_out, ids, route = (t.cuda() for t in case(T, E=E, K=K, H=H, F=F, dtype=torch.bfloat16, seed=T))
        bm = dk.block_m_for(T * K, E)
        assert same_layout(dk.align(ids, E, bm), dk.align_on_device(ids, E, bm), bm)
        got = dk.kernels(x, w_in, w_out, False, ids, route).float()
        want = dk.reference(x, w_in, w_out, False, ids, route).float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_auto_decode_experts_takes_triton_in_bf16_only():
    """`auto` settles on the Triton kernel for bf16 CUDA experts (timed faster than grouped_mm at 64-256
    slots, docs/benchmarks.md) before any step, and keeps deciding per call in fp32 (gather)."""
    from r1lightning.moe import experts_modules
    from r1lightning.moe.decode_experts import choose_mode, set_decode_mode

    model, _ = on_cuda(OLMOE, torch.bfloat16, moe_backend="grouped_mm")
    set_decode_mode(model, "auto")
    modes = {m._r1l_decode_mode for _, m in experts_modules(model)}
    assert modes == {"triton"}
    model.float()
    set_decode_mode(model, "auto")
    m = next(m for _, m in experts_modules(model))
    assert m._r1l_decode_mode == "auto" and choose_mode(m, torch.zeros(1, m.gate_up_proj.shape[-1], device="cuda")) == "gather"


def test_paged_graphs_triton_experts_greedy_matches_generate_fp32():
    model, tok = on_cuda(OLMOE, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    eos = pick_mid_batch_eos(model, tok, ids, mask, 16)
    params = SamplingParams(16, 0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    engine = PagedSampler(max_slots=4, block_size=16, decode_experts="triton")
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert engine.last_stats["graphs"] >= 1
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-4, rtol=0)


def test_paged_graphs_kernel_attention_bf16_as_close_to_fp32_as_the_gather(tiny_moe_config):
    # bf16 rounding differs between the kernel (fp32 accumulation over the pool) and SDPA over a bf16
    # copy, so neither equals the other; both are held against the fp32 model's own log-probs
    model, tok = on_cuda(OLMOE, torch.float32, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    params = SamplingParams(40, 0)
    fp32 = PagedSampler(max_slots=16, block_size=16, attention="gather").generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    model.to(torch.bfloat16)
    kernel = PagedSampler(max_slots=16, block_size=16)
    ours = kernel.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert kernel.last_stats["attention"] == "kernel"
    gather = PagedSampler(max_slots=16, block_size=16, attention="gather")
    ref = gather.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert gather.last_stats["attention"] == "gather"
    # a random tiny model is full of near-ties, so greedy paths part; compare each row up to where any does
    agree = ((ours.completion_ids == fp32.completion_ids) & (ref.completion_ids == fp32.completion_ids)).long().cumprod(-1).bool()
    assert agree.sum() > 200
    err_kernel = (ours.logprobs - fp32.logprobs)[agree].abs().mean()
    err_gather = (ref.logprobs - fp32.logprobs)[agree].abs().mean()
    assert err_kernel <= 1.25 * err_gather + 1e-3, (err_kernel, err_gather)


def test_paged_graphs_fp8_kv_kernel_equals_generate_over_an_fp8_rounded_cache():
    """`kv_dtype: fp8` on CUDA: the Triton kernel reading the e4m3 pool under graphs gives transformers'
    greedy tokens over a cache that rounds K/V the same way (fp32 model, so no other rounding)."""
    from tests.test_rollout_engine import fp8_rounded_generate

    model, tok = on_cuda(OLMOE, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    n = 16
    want, want_logp = fp8_rounded_generate(model, tok, ids, mask, n)
    engine = PagedSampler(max_slots=4, block_size=16, kv_dtype="fp8")
    ours = engine.generate(model, ids, mask, SamplingParams(n, 0), len(tok) + 1, tok.pad_token_id)
    assert engine.last_stats["attention"] == "kernel" and engine.last_stats["graphs"] >= 1
    assert torch.equal(ours.completion_ids, want)
    torch.testing.assert_close(ours.logprobs, want_logp, atol=2e-4, rtol=0)


def test_paged_graphs_preempt_and_keep_greedy_tokens(tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    params = SamplingParams(24, 0)
    eos = len(tok) + 1
    per_block = PagedSampler(block_size=4)._pool_blocks(model, ids.device, 1, 8, 0)[1]
    engine = PagedSampler(max_slots=4, block_size=4, sync_every=2, kv_cache_gib=13 * per_block / 2**30)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert engine.last_stats["preempted"] > 0
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert torch.equal(ours.completion_ids, ref.completion_ids)


def test_paged_graphs_bf16_equal_eager_and_see_weight_updates(tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config, torch.bfloat16, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)  # 36 rows through 16 slots
    params = SamplingParams(12, 0)
    graphs, eager = PagedSampler(max_slots=16, block_size=8), PagedSampler(max_slots=16, block_size=8, cuda_graphs=False)
    a = graphs.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    b = eager.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=0, rtol=0)
    n_graphs = graphs.last_stats["graphs"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    c = graphs.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    d = eager.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert graphs.last_stats["graphs"] == n_graphs
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert torch.equal(c.completion_ids, d.completion_ids)


def test_paged_graphs_seeded_sampling_logprobs_and_forced_lengths(tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    engine = PagedSampler(max_slots=4, block_size=4)
    params = SamplingParams(12, temperature=0.8, top_p=0.95, top_k=30, seed=5)
    a = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    b = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(a.completion_ids, b.completion_ids)
    with torch.no_grad():
        ref = training_logprobs(model, a, 0.8) * a.completion_mask
    torch.testing.assert_close(a.logprobs, ref, atol=1e-4, rtol=0)
    forced = torch.tensor([1, 12, 3, 40, 7, 2, 5, 9, 11], device="cuda")
    f = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id, forced_lengths=forced)
    assert f.completion_lengths.tolist() == forced.clamp(max=12).tolist()


@pytest.mark.skipif(not megablocks_status()[0], reason=f"megablocks: {megablocks_status()[1]}")
def test_paged_megablocks_prefill_graph_decode(tiny_moe_config):
    model, tok = on_cuda(tiny_moe_config, torch.bfloat16, moe_backend="megablocks")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    params = SamplingParams(10, 0)
    ours = PagedSampler(max_slots=8).generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert model.config._experts_implementation == "megablocks"  # restored after decode
    model.set_experts_implementation("grouped_mm")
    ref = PagedSampler(max_slots=8, cuda_graphs=False).generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert (ours.completion_ids == ref.completion_ids).float().mean() > 0.8


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_paged_compiled_decode_greedy_matches_generate_fp32(mode, tiny_moe_config):
    torch._dynamo.reset()
    model, tok = on_cuda(tiny_moe_config, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    eos = pick_mid_batch_eos(model, tok, ids, mask, 16)
    params = SamplingParams(16, 0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    engine = PagedSampler(compile=mode, max_slots=4, block_size=4)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    again = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(again.completion_ids, ours.completion_ids)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", [("greedy", 0, False, True), ("sample", 0, False, False), ("sample", 0, False, True),
                                  ("sample", 0, True, True)])
def test_draw_compiles_at_a_dynamic_width_with_the_real_vocab(mode):
    # OLMoE's 50,304-token vocab at two widths, as tail compaction calls it: session 15's formulation of the
    # forced-length draw failed here in Triton (`PassManager::run failed`); its tokens and log-probs checked
    import types

    from r1lightning.rollout.engine import draw

    torch._dynamo.reset()
    torch.manual_seed(0)
    V, eos = 50304, 7
    step_fn = torch.compile(draw, mode="default", dynamic=None)
    for N in (128, 224, 64):
        st = types.SimpleNamespace(logits=torch.randn(N, V, device="cuda") * 3, temperature=torch.full((), 0.7, device="cuda"),
                                   top_p_value=torch.full((), 0.95, device="cuda"), min_new=torch.zeros((), dtype=torch.long, device="cuda"),
                                   eos_mask=torch.zeros(V, dtype=torch.bool, device="cuda"),
                                   force_mask=torch.zeros(V, dtype=torch.bool, device="cuda"))
        st.eos_mask[eos] = st.force_mask[eos] = True
        st.logits[:, eos] += 6  # EOS likely: suppression before the forced step is visible
        step = torch.randint(0, 8, (N,), device="cuda")
        force = torch.randint(1, 10, (N,), device="cuda")
        nxt, logp = step_fn(st, mode, step, force, False)
        scaled = st.logits if mode[0] == "greedy" else st.logits / 0.7
        torch.testing.assert_close(logp, torch.log_softmax(scaled, -1).gather(-1, nxt[:, None])[:, 0], atol=1e-5, rtol=0)
        if mode[3]:
            assert (nxt[step == force - 1] == eos).all()
            assert not (nxt[step < force - 1] == eos).any()
        if mode[0] == "greedy":
            expect = scaled.masked_fill(((step < force - 1)[:, None]) & st.eos_mask[None], float("-inf")).argmax(-1)
            expect = torch.where(step == force - 1, eos, expect)
            assert torch.equal(nxt, expect)


@pytest.mark.parametrize("top_p", [1.0, 0.95])
def test_paged_compiled_pool_decode_compacts_with_forced_lengths(top_p, caplog):
    # `compile: default` + `attention: pool` at the real vocab through tail compaction with ragged forced
    # lengths (the long-tailed benchmark's path): every width compiles, no fallback, each row ends where forced
    torch._dynamo.reset()
    model, tok = on_cuda(dict(OLMOE, vocab_size=50304), torch.bfloat16, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    forced = torch.arange(ids.shape[0]) % 17 + 2  # 2..18 of 24: rows end one after another
    engine = PagedSampler(compile="default", attention="pool", max_slots=16, block_size=16)
    with caplog.at_level("WARNING", logger="r1lightning.rollout.paged"):
        out = engine.generate(model, ids, mask, SamplingParams(24, 1.0, top_p=top_p, seed=0), len(tok) + 5, tok.pad_token_id,
                              forced_lengths=forced)
    assert engine.last_stats["compactions"] >= 2
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    ends = (out.completion_ids == len(tok) + 5).float().argmax(-1) + 1
    assert torch.equal(ends.cpu(), forced)


@pytest.mark.parametrize("engine_kind", ["static", "paged"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decode_nucleus_sampling(engine_kind, mode, caplog):
    # Top-p's sort and cumsum run uncompiled inside the compiled step (`engine._nucleus`): under
    # reduce-overhead that break splits torch's CUDA graphs in two. Seeded draws must repeat, stay inside
    # top-k and the nucleus (a flat temperature makes a broken filter show), and carry the training
    # forward's log-probs
    torch._dynamo.reset()
    model, tok = on_cuda(OLMOE, moe_backend="grouped_mm")
    ids, mask = (t.cuda() for t in encode(tok, RAGGED))
    T, k, p = 1.5, 5, 0.8
    params = SamplingParams(12, temperature=T, top_p=p, top_k=k, seed=3)
    engine = (StaticCacheSampler(compile=mode) if engine_kind == "static"
              else PagedSampler(compile=mode, max_slots=4, block_size=4))
    with caplog.at_level("WARNING", logger="r1lightning.rollout"):
        a = engine.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
        b = engine.generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    assert torch.equal(a.completion_ids, b.completion_ids)
    with torch.no_grad():
        ref = training_logprobs(model, a, T) * a.completion_mask
        probs = torch.softmax(training_logits(model, a, T), -1)
    torch.testing.assert_close(a.logprobs, ref, atol=1e-4, rtol=0)
    chosen = probs.gather(-1, a.completion_ids[..., None])[..., 0]
    live = a.completion_mask.bool()
    rank = (probs > chosen[..., None]).sum(-1)[live]
    above = (probs * (probs > chosen[..., None])).sum(-1)[live]  # mass of the more probable tokens
    assert (rank < k).all() and (above < p + 1e-4).all()
    assert live.sum() > 60 and (rank > 0).float().mean() > 0.2  # draws, not argmax
