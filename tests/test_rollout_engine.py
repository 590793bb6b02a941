"""The static-cache rollout engine on CPU (no CUDA graphs): same completions as transformers'
`generate` under greedy decoding, log-probs equal to a training-style forward, sampling frequencies
that match the filtered distribution."""

import weakref

import pytest
import torch
from scipy import stats
from transformers import DynamicCache

from r1lightning.policy import Policy
from r1lightning.rollout import HFGenerateSampler, SamplingParams, StaticCacheSampler
from r1lightning.moe import decode_experts
from r1lightning.rollout.engine import filter_logits

# Sampled against recomputed fp32 log-probs: the same arithmetic in two summation orders, whose last bits
# differ with the CPU's vector width (AVX2: 1.03e-5 at |log p| 2.2, 4.7e-6 relative). A wrong temperature,
# position or token is off by 1e-3 or more.
LOGPROB_TOL = dict(atol=1e-5, rtol=1e-5)

PROMPTS = ["12+34=", "5+6=", "999+1=", "7=", "abc", "x+y*z="]
OLMOE = dict(model_type="olmoe", hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
             tie_word_embeddings=False)


def build(config, **policy_kw):
    torch.manual_seed(0)
    # A wide init gives varied greedy continuations (the default init repeats one token).
    model, tok = Policy(config=dict(config, initializer_range=0.5), tokenizer="char", **policy_kw).build()
    return model.eval(), tok


def encode(tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def pick_mid_batch_eos(model, tok, ids, mask, n):
    """A token id that greedy decoding emits first at step >= 2 in some rows and never in others."""
    unused = len(tok) + 1
    free = HFGenerateSampler(return_logprobs=False).generate(model, ids, mask, SamplingParams(n, 0), unused, tok.pad_token_id)
    rows = free.completion_ids
    for t in torch.unique(rows).tolist():
        hits = (rows == t)
        first = [int(h.nonzero()[0]) if h.any() else None for h in hits]
        if any(f is not None and 2 <= f < n - 2 for f in first) and any(f is None for f in first):
            return t
    raise AssertionError("no suitable EOS token for this seed")


def training_logits(model, rollout, temperature):
    """The temperature-scaled fp32 logits [N, C, V] that predict each completion token: one forward over
    prompt + completion."""
    ids, mask = rollout.input_ids(), rollout.attention_mask()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    P = rollout.prompt_ids.shape[1]
    logits = logits[:, P - 1 : -1].float()
    return logits / temperature if temperature > 0 else logits


def training_logprobs(model, rollout, temperature):
    """What GRPOModule.completion_logprobs computes, from `training_logits`."""
    logits = training_logits(model, rollout, temperature)
    return torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_matches_generate_with_ragged_prompts_and_mid_batch_eos(arch, attn, tiny_moe_config):
    config = tiny_moe_config if arch == "qwen3_moe" else OLMOE
    model, tok = build(config, attn_implementation=attn)
    ids, mask = encode(tok)
    n = 16
    eos = pick_mid_batch_eos(model, tok, ids, mask, n)
    params = SamplingParams(n, temperature=0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    engine = StaticCacheSampler(kv_bucket=8, sync_every=2)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    # some rows stopped early, some ran to the limit
    assert ref.truncated.any() and (~ref.truncated).any()
    assert (ref.completion_lengths < n).any()
    width = ref.completion_ids.shape[1]
    assert torch.equal(ours.completion_ids[:, :width], ref.completion_ids)
    assert (ours.completion_ids[:, width:] == tok.pad_token_id).all()
    assert torch.equal(ours.completion_mask[:, :width], ref.completion_mask)
    assert torch.equal(ours.truncated, ref.truncated)
    torch.testing.assert_close(ours.logprobs[:, :width], ref.logprobs, atol=2e-5, rtol=0)
    # the model is handed back as it came
    assert model.config._experts_implementation == "grouped_mm"


def test_stops_early_when_every_row_is_done(tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, ["12+34="] * 3)
    free = StaticCacheSampler().generate(model, ids, mask, SamplingParams(6, 0), len(tok) + 1, tok.pad_token_id)
    eos = int(free.completion_ids[0, 2])  # identical prompts: every row emits it at step 2 (or earlier)
    engine = StaticCacheSampler(sync_every=4)
    out = engine.generate(model, ids, mask, SamplingParams(64, 0), eos, tok.pad_token_id)
    assert engine.last_stats["steps"] == 4  # done after 3 tokens, noticed at the first check
    assert out.completion_lengths.tolist() == [int((free.completion_ids[0] == eos).nonzero()[0]) + 1] * 3
    assert not out.truncated.any()


def test_logprobs_equal_training_forward(tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok)
    params = SamplingParams(12, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    out = StaticCacheSampler(kv_bucket=4).generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        ref = training_logprobs(model, out, 0.7) * out.completion_mask
    assert out.completion_mask.sum() > 20
    torch.testing.assert_close(out.logprobs, ref, **LOGPROB_TOL)
    # the sampled tokens respect top-k: each one is among the 20 most likely at its step
    assert (out.logprobs[out.completion_mask.bool()] > -30).all()


def test_same_seed_same_completions_and_weight_updates_are_seen(tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok)
    engine = StaticCacheSampler()
    params = SamplingParams(10, temperature=1.0, seed=11)
    a = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    b = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(a.completion_ids, b.completion_ids)
    c = engine.generate(model, ids, mask, SamplingParams(10, temperature=1.0, seed=12), tok.eos_token_id, tok.pad_token_id)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # greedy: the engine and transformers agree; after an in-place update both see the new weights
    greedy = SamplingParams(10, 0)
    before = engine.generate(model, ids, mask, greedy, len(tok) + 1, tok.pad_token_id)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0) if not model.config.tie_word_embeddings else model.get_input_embeddings().weight.mul_(-1.0)
    after = engine.generate(model, ids, mask, greedy, len(tok) + 1, tok.pad_token_id)
    ref = HFGenerateSampler().generate(model, ids, mask, greedy, len(tok) + 1, tok.pad_token_id)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, ref.completion_ids)


def reference_filtered_probs(logits, temperature, top_k, top_p):
    """Expected next-token distribution, written as transformers' warpers define it (temperature,
    then top-k, then top-p on ascending cumulative probabilities)."""
    x = logits / temperature
    if top_k:
        kth = x.topk(top_k).values[-1]
        x = torch.where(x < kth, torch.tensor(float("-inf")), x)
    if top_p < 1:
        asc, order = x.sort()
        cum = asc.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[-1] = False
        x = x.clone()
        x[order[remove]] = float("-inf")
    return x.softmax(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 12, 1.0), (1.3, 0, 0.8), (0.9, 30, 0.9)])
def test_first_token_frequencies_match_the_distribution(temperature, top_k, top_p, tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, ["5+6="])
    n = 4000
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].double()
    probs = reference_filtered_probs(logits, temperature, top_k, top_p)
    params = SamplingParams(1, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    out = StaticCacheSampler().generate(model, ids.expand(n, -1), mask.expand(n, -1), params, len(tok) + 1, tok.pad_token_id)
    counts = torch.bincount(out.completion_ids[:, 0], minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0  # nothing outside top-k / the nucleus
    # chi-square over the supported tokens, pooling the rare ones so every expected count is >= 5
    support = probs > 0
    p, c = probs[support], counts[support]
    order = p.argsort(descending=True)
    p, c = p[order], c[order]
    big = n * p >= 5
    exp_counts = torch.cat([n * p[big], (n * p[~big]).sum().reshape(1)]) if (~big).any() else n * p[big]
    obs = torch.cat([c[big], c[~big].sum().reshape(1)]) if (~big).any() else c[big]
    assert support.sum() > 3
    result = stats.chisquare(obs.numpy(), exp_counts.numpy() * obs.sum().item() / exp_counts.sum().item())
    assert result.pvalue > 1e-3, (result, support.sum())
    # and the returned log-prob is the unfiltered temperature-scaled one (what training recomputes)
    full = torch.log_softmax(logits / temperature, -1).float()
    torch.testing.assert_close(out.logprobs[:, 0], full[out.completion_ids[:, 0]], **LOGPROB_TOL)


def test_filter_logits_top_p_keeps_the_smallest_nucleus():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(x, 0, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(x, 0, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(x, 1, 1.0 - 1e-9))
    assert kept.tolist() == [[True, False, False, False]]


def test_min_new_tokens_suppresses_eos(tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok)
    eos = pick_mid_batch_eos(model, tok, ids, mask, 16)
    out = StaticCacheSampler(min_new_tokens=16).generate(model, ids, mask, SamplingParams(16, 0), eos, tok.pad_token_id)
    assert out.completion_lengths.tolist() == [16] * len(PROMPTS)
    assert out.truncated.all()


@pytest.mark.parametrize("mode", ["grouped_mm", "gather", "triton"])
def test_decode_experts_match_transformers_grouped_mm(mode, tiny_moe_config):
    from transformers.integrations.moe import grouped_mm_experts_forward

    from r1lightning.moe import experts_modules

    model, _ = build(tiny_moe_config)
    _, experts = next(experts_modules(model))
    experts._r1l_decode_mode = mode
    torch.manual_seed(1)
    for T in (1, 3, 16):
        x = torch.randn(T, experts.gate_up_proj.shape[-1])
        idx = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(T)])
        w = torch.rand(T, 2).softmax(-1)
        assert decode_experts.choose_mode(experts, x) == mode
        with torch.no_grad():
            ours = decode_experts.decode_experts_forward(experts, x, idx, w)
            ref = grouped_mm_experts_forward(experts, x, idx, w)
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-6  # fp32 summation order only


def test_grpo_rollout_logprobs_match_the_module_forward(tiny_moe_config):
    from tests.test_grpo import tiny_module

    module = tiny_module(tiny_moe_config, sampler=StaticCacheSampler(), use_sampler_logprobs=True,
                         sampling={"max_new_tokens": 5, "temperature": 0.8})
    ids, mask = encode(module.tokenizer, ["1+2=", "30+4="])
    batch = {"prompt_ids": ids, "prompt_mask": mask, "columns": {"answer": ["3", "34"]}}
    rollout, columns, total, _ = module.rollout(batch)
    assert rollout.completion_ids.shape[0] == 8 and total.shape == (8,)
    recomputed = module.frozen_logprobs(rollout, module.model) * rollout.completion_mask
    torch.testing.assert_close(rollout.logprobs, recomputed, **LOGPROB_TOL)
    assert module.model.config._experts_implementation == "grouped_mm"


def test_compile_mode_is_validated():
    with pytest.raises(ValueError, match="compile: 'fast' is not one of"):
        StaticCacheSampler(compile="fast")


@pytest.mark.slow  # compiling the decode step takes ~10 s per mode on two cores
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decode_greedy_matches_generate(mode, tiny_moe_config):
    torch._dynamo.reset()
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok)
    eos = pick_mid_batch_eos(model, tok, ids, mask, 12)
    params = SamplingParams(12, temperature=0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    engine = StaticCacheSampler(compile=mode, kv_bucket=8)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    again = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)  # the compiled step, reused
    width = ref.completion_ids.shape[1]
    assert torch.equal(ours.completion_ids[:, :width], ref.completion_ids)
    assert torch.equal(again.completion_ids, ours.completion_ids)
    torch.testing.assert_close(ours.logprobs[:, :width], ref.logprobs, atol=2e-5, rtol=0)
    # Shorter prompts (GRPO batches vary in length) reuse the compiled step: no recompile.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    short_ids, short_mask = encode(tok, ["1+1=", "2+3=", "5+5=", "1+4=", "9=", "7+7="])
    assert short_ids.shape[1] < ids.shape[1]
    short = engine.generate(model, short_ids, short_mask, params, eos, tok.pad_token_id)
    assert counters["stats"]["unique_graphs"] == graphs
    ref_short = HFGenerateSampler().generate(model, short_ids, short_mask, params, eos, tok.pad_token_id)
    assert torch.equal(short.completion_ids[:, : ref_short.completion_ids.shape[1]], ref_short.completion_ids)


# -- the paged engine: continuous batching over slots, KV in blocks ---------------------------------
from r1lightning.errors import UserError  # noqa: E402
from r1lightning.rollout import PagedSampler  # noqa: E402

RAGGED = ["12+34=", "5+6=", "999+1=", "7=", "abc", "x+y*z=", "3*3=", "100-1=", "q"]


@pytest.mark.parametrize("attention", ["gather", "pool"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_paged_greedy_matches_generate_with_slots_reused(arch, attn, attention, tiny_moe_config):
    # 9 ragged prompts through 3 slots: rows finish at different steps and free slots get new samples
    config = tiny_moe_config if arch == "qwen3_moe" else OLMOE
    model, tok = build(config, attn_implementation=attn)
    ids, mask = encode(tok, RAGGED)
    n = 16
    eos = pick_mid_batch_eos(model, tok, ids, mask, n)
    params = SamplingParams(n, temperature=0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    # eager: prompts prefilled 3 tokens at a time (the chunked path with an additive mask)
    engine = PagedSampler(max_slots=3, block_size=4, kv_bucket=8, sync_every=2, attention=attention,
                          prefill_chunk=3 if attn == "eager" else 2048)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert (engine.last_stats["prefill_chunked"] > 0) == (attn == "eager")
    assert model.config._attn_implementation == attn  # the pool mode's attention function is gone again
    assert ref.truncated.any() and (~ref.truncated).any()
    assert engine.last_stats["slots"] == 3 and engine.last_stats["admitted"] == len(RAGGED)
    assert engine.last_stats["preempted"] == 0
    assert engine.last_stats["compactions"] >= 1  # the tail ran narrower, its sequences moved to low slots
    # gather reads up to a bucket over the longest live sequence (8 tokens here); the pool each slot to its own length
    assert engine.last_stats["kv_lens"] == (1 if attention == "pool" else 3)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(ours.completion_mask, ref.completion_mask)
    assert torch.equal(ours.truncated, ref.truncated)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=2e-5, rtol=0)
    assert model.config._experts_implementation == "grouped_mm"


class Fp8RoundedCache(DynamicCache):
    """transformers' cache storing K/V through fp8 e4m3 (saturating), as `kv_dtype: fp8`'s pool: a
    prompt attends to itself unrounded at prefill; every later step reads everything rounded."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        fresh = self.get_seq_length(layer_idx) == 0
        r = lambda x: x.clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype)  # noqa: E731
        k, v = super().update(r(key_states), r(value_states), layer_idx, *args, **kwargs)
        return (key_states, value_states) if fresh else (k, v)


def fp8_rounded_generate(model, tok, ids, mask, n):
    """transformers' greedy tokens [B, n] and their log-probs over an `Fp8RoundedCache`; the EOS is an id the
    vocabulary lacks, so nothing stops or is suppressed (the engines are called with the same)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, eos_token_id=len(tok) + 1, do_sample=False,
                         past_key_values=Fp8RoundedCache(config=model.config), return_dict_in_generate=True, output_logits=True,
                         pad_token_id=tok.pad_token_id)
    tokens = out.sequences[:, ids.shape[1]:]
    return tokens, torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_paged_fp8_kv_reports_values_it_saturates(caplog):
    """An fp8 pool saturates past ±448: the engine reports the largest prefilled |K|, |V| and warns once."""
    model, tok = build(OLMOE)
    ids, mask = encode(tok, RAGGED[:3])
    engine = PagedSampler(max_slots=3, block_size=4, kv_dtype="fp8")
    engine.generate(model, ids, mask, SamplingParams(4, 0), len(tok) + 1, tok.pad_token_id)
    assert 0 < engine.last_stats["kv_absmax"] < 448 and "saturate" not in caplog.text
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(1e4)
    with caplog.at_level("WARNING", logger="r1lightning.rollout.paged"):
        engine.generate(model, ids, mask, SamplingParams(4, 0), len(tok) + 1, tok.pad_token_id)
        engine.generate(model, ids, mask, SamplingParams(4, 0), len(tok) + 1, tok.pad_token_id)
    assert engine.last_stats["kv_absmax"] > 448
    assert caplog.text.count("kv_dtype fp8: prefilled K/V values reach") == 1
    plain = PagedSampler(max_slots=3, block_size=4)
    plain.generate(model, ids, mask, SamplingParams(2, 0), len(tok) + 1, tok.pad_token_id)
    assert "kv_absmax" not in plain.last_stats  # a pool in the compute dtype saturates nothing


@pytest.mark.parametrize("attention", ["gather", "pool"])
def test_paged_fp8_kv_equals_generate_over_an_fp8_rounded_cache(attention):
    """`kv_dtype: fp8` is exactly "K/V rounded to e4m3 when stored": same greedy tokens and log-probs as
    transformers' generate over a cache that rounds the same way, 9 ragged prompts through 3 reused
    slots; a pool of a quarter of the fp32 bytes. The unrounded pool gives other tokens here, so the
    comparison can tell the two apart."""
    model, tok = build(OLMOE)
    ids, mask = encode(tok, RAGGED)
    n = 16
    want, want_logp = fp8_rounded_generate(model, tok, ids, mask, n)
    kw = dict(max_slots=3, block_size=4, sync_every=2, attention=attention)
    fp8 = PagedSampler(kv_dtype="fp8", **kw)
    ours = fp8.generate(model, ids, mask, SamplingParams(n, 0), len(tok) + 1, tok.pad_token_id)
    assert fp8.last_stats["admitted"] == len(RAGGED) and fp8.last_stats["preempted"] == 0
    assert torch.equal(ours.completion_ids, want)
    torch.testing.assert_close(ours.logprobs, want_logp, atol=2e-4, rtol=0)
    full = PagedSampler(**kw)
    plain = full.generate(model, ids, mask, SamplingParams(n, 0), len(tok) + 1, tok.pad_token_id)
    assert not torch.equal(plain.completion_ids, want)
    assert fp8.last_stats["kv_bytes"] * 4 == full.last_stats["kv_bytes"]  # fp32 model: 4 bytes an element, fp8 1
    assert fp8.kv_token_bytes(model, ids.device) * 4 == full.kv_token_bytes(model, ids.device)
    with pytest.raises(UserError, match="kv_dtype: must be one of auto, fp8, got 'int4'"):
        PagedSampler(kv_dtype="int4")


@pytest.mark.parametrize("attention", ["gather", "pool"])
def test_paged_reused_slot_never_reads_its_previous_occupant(attention, tiny_moe_config):
    model, tok = build(tiny_moe_config)
    params = SamplingParams(12, temperature=0)
    eos = len(tok) + 1  # never sampled: every row runs 12 tokens
    engine = PagedSampler(max_slots=2, block_size=4, sync_every=3, attention=attention)
    ids, mask = encode(tok, RAGGED)
    batched = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    # the pool now holds other sequences' K/V; overwrite it with large garbage, then run each prompt
    # again in another order and alone: a read outside a slot's own tokens would change the tokens
    (state,) = engine._state.values()
    for t in state.cache.keys + state.cache.values:
        t.copy_(torch.randn_like(t) * 1e3)
    order = torch.randperm(len(RAGGED), generator=torch.Generator().manual_seed(0))
    shuffled = engine.generate(model, ids[order], mask[order], params, eos, tok.pad_token_id)
    assert torch.equal(shuffled.completion_ids, batched.completion_ids[order])
    fewer_ids, fewer_mask = encode(tok, RAGGED[3:5])  # fewer, shorter prompts: the same pool, not a new one
    fewer = engine.generate(model, fewer_ids, fewer_mask, params, eos, tok.pad_token_id)
    assert next(iter(engine._state.values())) is state
    assert torch.equal(fewer.completion_ids, batched.completion_ids[3:5])
    for i in (0, 3, 8):
        one_ids, one_mask = encode(tok, [RAGGED[i]])
        alone = PagedSampler(max_slots=1, block_size=4, attention=attention).generate(model, one_ids, one_mask, params, eos, tok.pad_token_id)
        assert torch.equal(alone.completion_ids[0], batched.completion_ids[i])
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert torch.equal(batched.completion_ids, ref.completion_ids)


def test_paged_admission_in_batches_keeps_greedy_tokens_with_fewer_prefills(tiny_moe_config):
    # 9 ragged prompts through 3 slots, rows ending one by one (EOS forced at distinct lengths):
    # admitting only when 2 slots are free (or the last sample waits) takes fewer prefill forwards
    # and changes no token
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, RAGGED)
    params = SamplingParams(16, temperature=0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, len(tok) + 1, tok.pad_token_id)  # no row ends
    # EOS: a token greedy decoding never picks here, so only the forced lengths end rows
    eos = next(t for t in range(len(tok)) if t != tok.pad_token_id and not bool((ref.completion_ids == t).any()))
    forced = torch.tensor([3, 9, 5, 14, 7, 4, 11, 6, 8])
    runs = {}
    for batch in (1, 2):
        engine = PagedSampler(max_slots=3, block_size=4, sync_every=1, admit_batch=batch, attention="pool")
        out = engine.generate(model, ids, mask, params, eos, tok.pad_token_id, forced_lengths=forced)
        for i, f in enumerate(forced.tolist()):
            assert torch.equal(out.completion_ids[i, : f - 1], ref.completion_ids[i, : f - 1])
            assert int(out.completion_ids[i, f - 1]) == eos and int(out.completion_mask[i].sum()) == f
        assert engine.last_stats["admitted"] == len(RAGGED)
        runs[batch] = (engine.last_stats, out.completion_ids)
    assert torch.equal(runs[1][1], runs[2][1])
    assert runs[2][0]["prefills"] < runs[1][0]["prefills"]
    with pytest.raises(UserError, match="admit_batch: must be >= 1"):
        PagedSampler(admit_batch=0)


@pytest.mark.parametrize("prefill_chunk", [2048, 5])
@pytest.mark.parametrize("attention", ["gather", "pool"])
def test_paged_preemption_under_a_small_pool_keeps_greedy_tokens(attention, prefill_chunk, tiny_moe_config, caplog):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, RAGGED)
    params = SamplingParams(24, temperature=0)
    eos = len(tok) + 1
    # one sequence needs ceil((6 + 24) / 4) = 8 blocks; the pool holds 12 besides the trash block,
    # so 4 slots that start together must preempt as they grow
    probe = PagedSampler(max_slots=4, block_size=4)
    per_block = probe._pool_blocks(model, ids.device, 1, 8, 0)[1]
    engine = PagedSampler(max_slots=4, block_size=4, sync_every=2, kv_cache_gib=13 * per_block / 2**30, attention=attention,
                          prefill_chunk=prefill_chunk)
    with caplog.at_level("WARNING", logger="r1lightning.rollout.paged"):
        ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
        engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert engine.last_stats["kv_blocks"] == 13
    assert engine.last_stats["preempted"] > 0
    # said once per engine, with the count and what avoids it
    said = [r.getMessage() for r in caplog.records if "preempted" in r.getMessage()]
    assert len(said) == 1 and f"4 slots) could not hold every live sequence: {engine.last_stats['preempted']} were" in said[0]
    # chunk 5: the 6-token prompts and every re-admitted sequence (prompt + sampled tokens) go 5 tokens
    # at a time, each chunk attending to the earlier ones through the slot's blocks
    chunked = engine.last_stats["prefill_chunked"]
    assert chunked == 0 if prefill_chunk == 2048 else chunked >= engine.last_stats["preempted"] + 1
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=2e-5, rtol=0)


def test_paged_budget_too_small_for_one_sequence_is_a_user_error(tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok)
    engine = PagedSampler(block_size=4, kv_cache_gib=1e-6)
    with pytest.raises(UserError, match=r"kv_cache_gib: 1e-06 GiB holds \d+ KV tokens .* one sequence .* needs 72"):
        engine.generate(model, ids, mask, SamplingParams(64, 0), tok.eos_token_id, tok.pad_token_id)
    with pytest.raises(UserError, match="max_slots"):
        PagedSampler(max_slots=0)
    with pytest.raises(UserError, match="attention: must be auto, pool or gather"):
        PagedSampler(attention="flash")


def test_paged_sampled_logprobs_equal_training_forward(tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, RAGGED)
    params = SamplingParams(12, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    engine = PagedSampler(max_slots=4, block_size=4)
    out = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    again = engine.generate(model, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(out.completion_ids, again.completion_ids)  # seeded
    with torch.no_grad():
        ref = training_logprobs(model, out, 0.7) * out.completion_mask
    assert out.completion_mask.sum() > 30
    torch.testing.assert_close(out.logprobs, ref, **LOGPROB_TOL)


@pytest.mark.parametrize("engine", ["static", "paged"])
def test_forced_lengths_end_rows_at_the_drawn_step(engine, tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok)
    eos = pick_mid_batch_eos(model, tok, ids, mask, 16)  # would end some rows early on its own
    forced = torch.tensor([1, 16, 3, 40, 7, 2])  # 40 > max_new_tokens: runs to the limit
    sampler = StaticCacheSampler() if engine == "static" else PagedSampler(max_slots=4, block_size=4)
    out = sampler.generate(model, ids, mask, SamplingParams(16, 1.0, seed=0), eos, tok.pad_token_id, forced_lengths=forced)
    assert out.completion_lengths.tolist() == [1, 16, 3, 16, 7, 2]
    if engine == "paged":
        assert sampler.last_stats["compactions"] >= 1
    assert out.truncated.tolist() == [False, False, False, True, False, False]
    ends = out.completion_ids[torch.arange(6), out.completion_lengths - 1]
    assert (ends[~out.truncated] == eos).all()
    with torch.no_grad():
        ref = training_logprobs(model, out, 1.0) * out.completion_mask
    torch.testing.assert_close(out.logprobs, ref, **LOGPROB_TOL)  # a forced EOS keeps its true log-prob


def test_paged_min_new_tokens_and_one_token(tiny_moe_config):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok)
    eos = pick_mid_batch_eos(model, tok, ids, mask, 16)
    out = PagedSampler(min_new_tokens=16, max_slots=4).generate(model, ids, mask, SamplingParams(16, 0), eos, tok.pad_token_id)
    assert out.completion_lengths.tolist() == [16] * len(PROMPTS) and out.truncated.all()
    one = PagedSampler(max_slots=4).generate(model, ids, mask, SamplingParams(1, 0), eos, tok.pad_token_id)
    ref = HFGenerateSampler().generate(model, ids, mask, SamplingParams(1, 0), eos, tok.pad_token_id)
    assert torch.equal(one.completion_ids, ref.completion_ids)


def test_grpo_releases_the_paged_cache_for_the_update(tiny_moe_config, monkeypatch):
    import gc

    from r1lightning.rollout import engine
    from tests.test_grpo import tiny_module

    collections = []
    collect = gc.collect
    monkeypatch.setattr(engine.gc, "collect", lambda *a: collections.append(1) or collect(*a))

    module = tiny_module(tiny_moe_config, sampler=PagedSampler(max_slots=3), use_sampler_logprobs=True,
                         sampling={"max_new_tokens": 5, "temperature": 0.8})
    ids, mask = encode(module.tokenizer, ["1+2=", "30+4="])
    batch = {"prompt_ids": ids, "prompt_mask": mask, "columns": {"answer": ["3", "34"]}}
    rollout, _, total, _ = module.rollout(batch)
    assert module.sampler._state  # the pool lives through the rollout ...
    recomputed = module.frozen_logprobs(rollout, module.model) * rollout.completion_mask
    torch.testing.assert_close(rollout.logprobs, recomputed, **LOGPROB_TOL)
    pool = [weakref.ref(t) for st in module.sampler._state.values() for t in vars(st).values() if isinstance(t, torch.Tensor)]
    pool += [weakref.ref(t) for st in module.sampler._state.values() for t in st.cache.keys + st.cache.values]
    module.sampler.release_for_update()
    assert not module.sampler._state  # ... and not through the update:
    assert pool and all(r() is None for r in pool)  # its tensors are gone, not kept alive by a reference cycle
    # ... freed by breaking the state's cycles, without a full collection (~0.2 s in a loaded process)
    assert not module.sampler.last_release_collected and not collections
    static = StaticCacheSampler()
    static.generate(module.model, ids, mask, SamplingParams(3, 0), module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
    static.release_for_update()
    assert static._state  # keep_cache: the static engine keeps it (its default)


@pytest.mark.slow  # compiling the decode step takes ~10 s on two cores
@pytest.mark.parametrize("attention,experts", [("gather", "auto"), ("pool", "auto"), ("pool", "triton")])
def test_paged_compiled_decode_greedy_matches_generate(attention, experts, tiny_moe_config):
    # pool: attention from the KV pool is one opaque op (paged_attention.paged_decode) inside the compiled step;
    # triton: so are the experts (decode_kernel.moe_decode), which choose their path when they run, untraced
    torch._dynamo.reset()
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, RAGGED)
    eos = pick_mid_batch_eos(model, tok, ids, mask, 12)
    params = SamplingParams(12, temperature=0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    from torch._dynamo.utils import counters

    counters.clear()
    engine = PagedSampler(compile="default", max_slots=4, block_size=4, attention=attention, decode_experts=experts)
    ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert engine.last_stats["attention"] == attention
    # the tail ran narrower (compaction) on a step compiled twice at most: static, then width-dynamic
    assert engine.last_stats["compactions"] >= 1
    assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
    again = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(again.completion_ids, ours.completion_ids)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=2e-5, rtol=0)


def fake_compile(fail_static: bool = False):
    """Stands in for torch.compile: runs the step eagerly, and the width-dynamic compile fails once the width
    changes (Inductor on the H200, session 15); with `fail_static` every compile does. Records each `dynamic`."""
    from torch._inductor.exc import InductorError

    made = []

    def compile(fn, mode=None, dynamic=None):
        made.append(dynamic)
        widths = []

        def run(st, model, mode_, mask_dtype):
            widths.append(st.tok.shape[0])
            if fail_static or (dynamic is None and widths[-1] != widths[0]):
                raise InductorError(RuntimeError("PassManager::run failed"), None)
            return fn(st, model, mode_, mask_dtype)

        return run

    return compile, made


def test_paged_compile_falls_back_to_one_compile_per_width(tiny_moe_config, monkeypatch, caplog):
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, RAGGED)
    eos = pick_mid_batch_eos(model, tok, ids, mask, 12)
    params = SamplingParams(12, temperature=0)
    ref = HFGenerateSampler().generate(model, ids, mask, params, eos, tok.pad_token_id)
    compile, made = fake_compile()
    monkeypatch.setattr(torch, "compile", compile)
    engine = PagedSampler(compile="default", max_slots=4, block_size=4)
    with caplog.at_level("WARNING", logger="r1lightning.rollout.paged"):
        ours = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert engine.last_stats["compactions"] >= 1  # the width changed, so the shared compile failed ...
    warned = [r.getMessage() for r in caplog.records if "failed for the decode step" in r.getMessage()]
    assert len(warned) == 1 and "PassManager::run failed" in warned[0]
    # ... and the narrower width got its own static compile, nothing lost: the same greedy tokens as `generate`
    assert made == [None, False]
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    with caplog.at_level("WARNING", logger="r1lightning.rollout.paged"):
        again = engine.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert made == [None, False, False] and len(caplog.records) == 1  # the full width too; said once
    assert torch.equal(again.completion_ids, ref.completion_ids)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=2e-5, rtol=0)
    compile, made = fake_compile(fail_static=True)  # every compile fails: after the second, no more are tried
    monkeypatch.setattr(torch, "compile", compile)
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1lightning.rollout.paged"):
        eager = PagedSampler(compile="default", max_slots=4, block_size=4)
        out = eager.generate(model, ids, mask, params, eos, tok.pad_token_id)
        again = eager.generate(model, ids, mask, params, eos, tok.pad_token_id)
    assert eager.last_stats["compactions"] >= 1
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "compile: default failed for the decode step at width 4",
        "compile: default failed for the decode step at width 4 as well"]
    assert made == [None, False]  # the narrower width was not compiled: it ran uncompiled straight away
    assert torch.equal(out.completion_ids, ref.completion_ids) and torch.equal(again.completion_ids, ref.completion_ids)


@pytest.mark.slow  # compiling the decode step takes ~10 s on two cores
@pytest.mark.parametrize("attention", ["gather", "pool"])
def test_paged_compiled_decode_with_an_fp8_pool(attention, tiny_moe_config):
    # the pool's byte-view writes and fp8 reads inside the compiled step: no graph breaks, the rounded reference's tokens
    torch._dynamo.reset()
    model, tok = build(tiny_moe_config)
    ids, mask = encode(tok, RAGGED)
    n = 12
    want, want_logp = fp8_rounded_generate(model, tok, ids, mask, n)
    from torch._dynamo.utils import counters

    counters.clear()
    engine = PagedSampler(compile="default", max_slots=4, block_size=4, attention=attention, kv_dtype="fp8")
    ours = engine.generate(model, ids, mask, SamplingParams(n, 0), len(tok) + 1, tok.pad_token_id)
    assert engine.last_stats["attention"] == attention and not counters["graph_break"]
    assert torch.equal(ours.completion_ids, want)
    torch.testing.assert_close(ours.logprobs, want_logp, atol=2e-4, rtol=0)


PAGED_FIT_SAMPLER = {"class_path": "r1lightning.rollout.PagedSampler", "init_args": {"max_slots": 3, "block_size": 4}}


@pytest.mark.parametrize("fp8_corrected", [False, True])
def test_paged_engine_in_a_grpo_fit_with_dynamic_sampling_and_two_iterations(fp8_corrected, tmp_path, tiny_moe_config, monkeypatch):
    # fp8_corrected: the pool in fp8 and `loss.sampler_correction` weighing its samples, from YAML, composed with the rest
    import json

    from r1lightning.cli import R1CLI
    from tests.test_grpo import ROWS, grpo_fit_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    sampler = json.loads(json.dumps(PAGED_FIT_SAMPLER))
    loss, rewards = {"mask_truncated_completions": True}, [{"fn": "format", "weight": 1.0}]
    if fp8_corrected:  # rows with a loss: no masked truncations (6 new tokens), a reward with variance
        sampler["init_args"]["kv_dtype"] = "fp8"
        loss, rewards = {"sampler_correction": "token_truncate"}, [{"fn": "tests.trl_style_reward.text_hash_reward"}]
    config = grpo_fit_config(tiny_moe_config, "prompts.jsonl", rewards, sampler=sampler, loss=loss)
    (tmp_path / "grpo.yaml").write_text(json.dumps(config))
    cli = R1CLI(args=["fit", "-c", "grpo.yaml"])
    assert cli.trainer.global_step == 4
    sampler = cli.model.sampler
    assert isinstance(sampler, PagedSampler) and sampler.last_stats["admitted"] >= 8
    assert not sampler._state  # released for the update of the last step
    logged = cli.trainer.logged_metrics
    assert 0 < logged["train/completions/mean_length"] <= 6
    # the engine's counters, per step: 8 rows of at most 6 tokens through 3 slots, the pool big enough for all
    assert logged["train/rollout/preempted"] == 0 and 1 <= logged["train/rollout/max_live"] <= 3
    assert 6 <= logged["train/rollout/decode_steps"] and logged["train/rollout/prefill_tokens"] >= 8
    assert 0 < logged["train/rollout/kv_GiB"] < 0.01
    assert cli.model.engine_stats is None  # taken when logged: a later `generate` adds to no step's counters
    if fp8_corrected:  # rounded K/V: the sampler's log-probs differ from the training forward's, a little
        assert sampler.kv_dtype == "fp8" and 0 < logged["train/sampling/sampling_logp_difference/mean"] < 0.5
        assert 0.5 < logged["train/sampling/importance_sampling_ratio/mean"] < 1.5
    else:
        assert "train/sampling/importance_sampling_ratio/mean" not in logged


def test_a_grpo_fit_with_everything_offloaded_while_sampling_follows_the_same_trajectory(tmp_path, tiny_moe_config, monkeypatch):
    """Through LightningCLI and Lightning's optimizer wrapper, with dynamic sampling and mu = 2: the reference and
    AdamW's state on the host for every rollout (true), or the reference parked on the host for every update
    (auto, as on a GPU: the paged engine's CPU budget is unbounded, so nothing moves for sampling) give the same
    weights as nothing moved."""
    import json

    from r1lightning.cli import R1CLI
    from tests.test_grpo import ROWS, grpo_fit_config
    from tests.test_offload import as_if_on_a_gpu

    monkeypatch.chdir(tmp_path)
    as_if_on_a_gpu(monkeypatch)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    weights, start = {}, None
    for setting in (False, "auto", True):
        config = grpo_fit_config(tiny_moe_config, "prompts.jsonl", [{"fn": "tests.trl_style_reward.text_hash_reward", "weight": 1.0}],
                                 sampler=PAGED_FIT_SAMPLER, offload_reference=setting, offload_optimizer=setting)
        (tmp_path / "grpo.yaml").write_text(json.dumps(config))
        cli = R1CLI(args=["fit", "-c", "grpo.yaml", "--trainer.max_steps", "0"])  # the initial weights
        start = {n: p.detach().clone() for n, p in cli.model.model.named_parameters()}
        cli = R1CLI(args=["fit", "-c", "grpo.yaml"])
        assert cli.trainer.global_step == 4
        metrics = cli.trainer.logged_metrics
        # true: steps 2-4 sampled with AdamW's moments (of the steps before) on the host
        assert float(metrics["train/offload/reference"]) == float(metrics["train/offload/optimizer"]) == float(setting is True)
        assert float(metrics["train/offload/reference_update"]) == float(bool(setting))
        assert len(cli.model.optimizers().optimizer.state) > 0
        weights[setting] = {n: p.detach().clone() for n, p in cli.model.model.named_parameters()}
    assert all(torch.equal(weights[s][n], weights[False][n]) for s in ("auto", True) for n in weights[False])
    assert not all(torch.equal(weights[True][n], start[n]) for n in start)  # and they did train
