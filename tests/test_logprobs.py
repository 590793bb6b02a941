"""Chunked log-probs from hidden states equal the [tokens, V] ones (values and gradients, fp32), the
packed update equals the padded one, and the chunked path never allocates a [tokens, V] tensor."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from r1lightning.grpo import GRPOModule
from r1lightning.logprobs import pack_rows, pack_sequences, padded_layout, plan_micro_batches, token_logprobs
from r1lightning.losses import AGGREGATIONS, grpo_loss
from r1lightning.options import GRPOLossOptions, SamplingOptions
from r1lightning.policy import Policy
from r1lightning.rewards import Reward
from r1lightning.rollout import Rollout

TOL = dict(rtol=1e-6, atol=1e-6)


def _inputs(M=37, H=16, V=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=g).requires_grad_(True)
    weight = torch.randn(V, H, generator=g).div_(H**0.5).requires_grad_(True)
    b = torch.randn(V, generator=g).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (M,), generator=g)
    return hidden, weight, b, targets


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_and_entropy_equal_the_full_ones(temperature, bias):
    hidden, weight, b, targets = _inputs(bias=bias)
    full, full_ent = token_logprobs(hidden, weight, targets, bias=b, temperature=temperature, with_entropy=True, impl="full")
    ours, ent = token_logprobs(hidden, weight, targets, bias=b, temperature=temperature, with_entropy=True, chunk_tokens=8)
    torch.testing.assert_close(ours, full, **TOL)
    torch.testing.assert_close(ent, full_ent, **TOL)
    assert not ent.requires_grad
    # a non-uniform upstream gradient, as the GRPO loss gives
    w = torch.linspace(-2, 3, hidden.shape[0])
    for got, want in zip(_grads((ours * w).sum(), [hidden, weight, b]), _grads((full * w).sum(), [hidden, weight, b])):
        torch.testing.assert_close(got, want, **TOL)


def test_frozen_weights_get_no_gradient_and_no_grad_mode_works():
    hidden, weight, _, targets = _inputs(bias=False)
    weight.requires_grad_(False)
    logp, _ = token_logprobs(hidden, weight, targets, chunk_tokens=5)
    (g,) = torch.autograd.grad(logp.sum(), [hidden])
    (want,) = torch.autograd.grad(token_logprobs(hidden, weight, targets, impl="full")[0].sum(), [hidden])
    torch.testing.assert_close(g, want, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(hidden, weight, targets, chunk_tokens=5)[0], logp.detach(), **TOL)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_chunked_grpo_loss_equals_the_full_one(aggregation):
    n, C = 6, 7
    hidden, weight, _, targets = _inputs(M=n * C, bias=False, seed=1)
    g = torch.Generator().manual_seed(2)
    mask = (torch.arange(C)[None] < torch.tensor([7, 3, 5, 1, 7, 4])[:, None]).float()  # [n, C] ragged
    shift = torch.randn(n, C, generator=g) * 0.3  # old policy = current + noise: some ratios clip
    ref = torch.randn(n, C, generator=g) * 0.1 - 3.0
    adv = torch.randn(n, generator=g)
    results = []
    for impl in ("full", "chunked"):
        logp, _ = token_logprobs(hidden, weight, targets, temperature=0.9, impl=impl, chunk_tokens=4)
        logp = logp.view(n, C)
        loss, metrics = grpo_loss(logp, logp.detach() + shift, adv, mask, ref, beta=0.04,
                                  aggregation=aggregation, max_completion_length=C, num_micro_batches=2)
        results.append((loss, metrics, _grads(loss, [hidden, weight])))
    (l0, m0, g0), (l1, m1, g1) = results
    torch.testing.assert_close(l1, l0, **TOL)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], **TOL)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **TOL)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op returns (inputs are created outside the mode)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_path_never_allocates_tokens_by_vocab():
    M, H, V, chunk = 512, 8, 1000, 32
    hidden, weight, _, targets = _inputs(M=M, H=H, V=V, bias=False)
    probe = _LargestAllocation()
    with probe:
        logp, _ = token_logprobs(hidden, weight, targets, with_entropy=True, chunk_tokens=chunk)
        (logp * torch.linspace(0, 1, M)).sum().backward()
    assert probe.largest <= chunk * V  # one chunk's logits; [V, H] and [M, H] gradients are smaller here
    probe_full = _LargestAllocation()
    with probe_full:
        token_logprobs(hidden, weight, targets, impl="full")[0].sum().backward()
    assert probe_full.largest >= M * V  # the check does see the full logits when they exist


# -- layouts -------------------------------------------------------------------------------------
def test_rows_are_packed_first_fit_decreasing_within_the_longest_width():
    assert pack_rows([5, 3, 2, 4, 1]) == [[0], [3, 4], [1, 2]]  # rows as wide as 5: 5 | 4 + 1 | 3 + 2
    assert plan_micro_batches([10, 3, 3, 9, 2], token_budget=20) == [[0, 3], [1, 2, 4]]
    assert plan_micro_batches([30, 3], token_budget=20) == [[0], [1]]  # too long: a micro-batch of its own
    assert plan_micro_batches([3] * 5, token_budget=100, max_sequences=2) == [[0, 1], [2, 3], [4]]


def _ragged_rollout(vocab=40, eos=2, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_lens, completion_lens = [3, 5, 2, 5, 4, 1], [4, 7, 1, 3, 7, 3]  # lengths 7 12 3 8 11 4
    P, C = max(prompt_lens), max(completion_lens)
    N = len(prompt_lens)
    prompt_ids = torch.full((N, P), pad)
    prompt_mask = torch.zeros(N, P, dtype=torch.long)
    completion_ids = torch.full((N, C), pad)
    completion_mask = torch.zeros(N, C, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_ids[i, P - p :] = torch.randint(3, vocab, (p,), generator=g)
        prompt_mask[i, P - p :] = 1
        completion_ids[i, :c] = torch.randint(3, vocab, (c,), generator=g)
        if c < C:
            completion_ids[i, c - 1] = eos
        completion_mask[i, :c] = 1
    truncated = completion_mask.sum(-1) == C
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated)


def test_packed_layout_restarts_positions_and_predicts_each_completion_token():
    r = _ragged_rollout()
    lay = pack_sequences(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, [1, 2, 3], pad_token_id=0)
    assert lay.attention_mask is None and lay.input_ids.shape == (2, 12)  # rows: 12 | 8 + 3 (+ 1 pad)
    assert lay.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]  # the pad continues the last one
    flat = lay.input_ids.reshape(-1)
    # the state at `positions` predicts `targets`, the next input token
    assert torch.equal(flat[lay.positions + 1], lay.targets)
    starts = (lay.position_ids == 0).sum().item()
    assert starts == 3
    padded = padded_layout(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, [1, 2, 3])
    assert torch.equal(padded.input_ids.reshape(-1)[padded.positions + 1], padded.targets)
    assert torch.equal(lay.scatter(lay.targets.float()), padded.scatter(padded.targets.float()))


# -- the update -----------------------------------------------------------------------------------
def _module(tiny_moe_config, attn="sdpa", **kwargs):
    torch.manual_seed(0)
    aggregation = kwargs.pop("aggregation", "grpo")
    args = dict(sampling=SamplingOptions(num_samples=3, max_new_tokens=7, temperature=0.8),
                loss=GRPOLossOptions(beta=0.04, aggregation=aggregation), router_aux_loss_coef=0.0, log_completions_every=0)
    args.update(kwargs)
    module = GRPOModule(Policy(config=tiny_moe_config, tokenizer="char", attn_implementation=attn), rewards=[Reward("accuracy")], **args)
    module.configure_model()
    module.model.float()
    return module


def _update(module, rollout, advantages, mask, old=None):
    """One `optimise` call; returns (stats, accumulated gradients, ref log-probs)."""
    from tests.test_grpo import record_gradients

    grads = record_gradients(module)
    micro = module.micro_batches(rollout, mask)
    ref = module.frozen_logprobs(rollout, module.ref_model, micro)
    stats = module.optimise(rollout, advantages, mask, old, ref, micro)
    return stats, grads, ref, micro


@pytest.mark.parametrize("aggregation,attn", [(a, "sdpa") for a in AGGREGATIONS] + [("dapo", "eager")])
def test_packed_update_equals_the_padded_full_logits_update(tiny_moe_config, aggregation, attn):
    rollout = _ragged_rollout()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.3])
    mask = rollout.completion_mask.float()
    mask[0] = 0  # a row without loss (dynamic sampling / overlong filtering): packing leaves it out
    # bnpo's normaliser depends on how rows are split, so it is compared with one micro-batch each
    budget = 10_000 if aggregation == "bnpo" else 24  # [12, 11] | [8, 4 + 3]
    padded_size = 6 if aggregation == "bnpo" else 2
    out = {}
    for name, kw in {"padded_full": dict(packing=False, logprob_impl="full", micro_batch_size=padded_size),
                     "packed_chunked": dict(packing=True, logprob_impl="chunked", micro_batch_tokens=budget)}.items():
        module = _module(tiny_moe_config, attn, aggregation=aggregation, num_iterations=2, **kw)
        old = module.frozen_logprobs(rollout, module.model)
        out[name] = _update(module, rollout, advantages, mask, old)
    (s0, g0, ref0, _), (s1, g1, ref1, micro) = out["padded_full"], out["packed_chunked"]
    if aggregation != "bnpo":
        assert micro == [[1, 4], [3, 5, 2]]  # two micro-batches, one row holding two sequences
    on = mask.bool()
    torch.testing.assert_close(ref1[on], ref0[on], rtol=1e-5, atol=1e-6)
    for k in ("loss", "kl", "entropy", "clip_ratio/region_mean", "grad_norm"):
        torch.testing.assert_close(torch.tensor(s1[k]), torch.tensor(s0[k]), rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_micro_batches_follow_the_token_budget(tiny_moe_config):
    rollout = _ragged_rollout()
    module = _module(tiny_moe_config, micro_batch_tokens=13)
    micro = module.micro_batches(rollout, rollout.completion_mask.float())
    lengths = (rollout.prompt_mask.sum(-1) + rollout.completion_mask.sum(-1)).tolist()  # [7, 12, 3, 8, 11, 4]
    assert sorted(i for mb in micro for i in mb) == list(range(6))
    for mb in micro:
        lay = module.layout(rollout, mb)
        assert lay.padded_tokens <= 13 or len(mb) == 1
        assert lay.real_tokens == sum(lengths[i] for i in mb)
    assert micro == [[1], [4], [3], [0], [5, 2]]  # longest first; 4 + 3 share a micro-batch
    assert module.padding_fraction(rollout, micro) == pytest.approx(1 / 46)  # one pad: [5, 2] is 4 | 3 + 1


# -- GPU: liger-kernel against the chunked path (`python -m pytest -m gpu tests/test_logprobs.py`) -----
@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_liger_logprobs_match_the_chunked_ones_on_gpu(temperature):
    from r1lightning.logprobs import liger_available

    if not liger_available():
        pytest.skip("needs liger-kernel and CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    M, H, V = 3000, 256, 50_304
    hidden = torch.randn(M, H, device="cuda", generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).requires_grad_(True)
    targets = torch.randint(0, V, (M,), device="cuda", generator=g)
    upstream = torch.linspace(-2, 3, M, device="cuda")
    out = {}
    for impl in ("chunked", "liger"):
        logp, ent = token_logprobs(hidden, weight, targets, temperature=temperature, with_entropy=True, impl=impl)
        out[impl] = (logp.detach(), ent, *torch.autograd.grad((logp * upstream).sum(), [hidden, weight]))
    for a, b in zip(out["liger"], out["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_chunked_head_peak_memory_on_gpu_is_far_below_the_logits():
    """16k tokens of the OLMoE head (V = 50,304, H = 2,048, bf16): the fp32 logits alone would be
    16,384 x 50,304 x 4 B = 3.3 GB (and as much again for log-softmax and gradients). The chunked
    path holds the fp32 weight-gradient accumulator (412 MB), the bf16 gradients (206 + 67 MB) and
    one chunk's transients (< 0.7 GB)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    M, H, V = 16_384, 2_048, 50_304
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(M, H, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, V, (M,), device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, _ = token_logprobs(hidden, weight, targets, with_entropy=True)
    (logp * torch.linspace(-1, 1, M, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 2 * 2**30, f"{peak / 2**30:.2f} GiB"


def test_a_rank_with_fewer_micro_batches_runs_empty_ones_that_change_nothing(tiny_moe_config):
    """Under FSDP/DDP every rank must run as many forwards as the busiest one; the extra ones count zero."""
    rollout = _ragged_rollout()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.3])
    mask = rollout.completion_mask.float()
    runs = []
    for extra in (0, 2):
        module = _module(tiny_moe_config, micro_batch_tokens=24)
        module._max_across_ranks = lambda count, extra=extra: count + extra
        stats, grads, _, micro = _update(module, rollout, advantages, mask)
        assert sum(not rows for rows in micro) == extra
        runs.append((stats, grads))
    (s0, g0), (s1, g1) = runs
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7)
